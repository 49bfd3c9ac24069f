"""The clm objective against the cross-entropy written out by hand."""

import torch

from llmzoo.interfaces import ModelOutput
from llmzoo_plugins.clm import CausalLM
from llmzoo.losses import run_objective


class FixedLogits(torch.nn.Module):
    def __init__(self, logits, aux=None):
        super().__init__()
        self.logits, self.aux = logits, aux

    def forward(self, ids):
        return ModelOutput(self.logits, self.aux)


def manual_ce(logits, labels):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t].double()
            total += (torch.logsumexp(row, 0) - row[y]).item()
            n += 1
    return total / n, n


def test_clm_loss_with_ignore_index_and_z_loss_and_aux():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, 2] = labels[1, 5] = -100
    ce, n = manual_ce(logits, labels)
    out = run_objective(FixedLogits(logits), CausalLM(), {"input_ids": ids, "labels": labels})
    assert abs(out.value.item() - ce) < 1e-5 and int(out.metrics["tokens"].value) == n

    lse = torch.stack([logits[b, t].logsumexp(0) for b in range(2) for t in range(5) if labels[b, t + 1] != -100])
    aux = torch.tensor(0.25)
    out = run_objective(FixedLogits(logits, aux), CausalLM(z_loss=1e-2, aux_loss_weight=0.5),
                        {"input_ids": ids, "labels": labels})
    expected = ce + 1e-2 * (lse ** 2).mean().item() + 0.5 * 0.25
    assert abs(out.value.item() - expected) < 1e-5


def test_labels_default_to_input_ids():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(1, 4, 5, generator=g), torch.randint(0, 5, (1, 4), generator=g)
    out = run_objective(FixedLogits(logits), CausalLM(), {"input_ids": ids})
    assert abs(out.value.item() - manual_ce(logits, ids)[0]) < 1e-5


# --- fused linear cross-entropy (objective.fused_ce=true) against logits + F.cross_entropy ---

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import PARALLEL_COMMON, logged, run_cli, tiny_cfg, train_run  # noqa: E402
from llmzoo.shared.losses import linear_cross_entropy  # noqa: E402
from llmzoo_plugins.sft import SFT  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_linear_cross_entropy_equals_the_logits_formula(dtype, z_loss, chunk):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 7, 16, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (2, 7), generator=g)
    t[0, 3] = t[1, 6] = t[1, 0] = -100
    loss, ce, z = linear_cross_entropy(h, w, t, z_loss=z_loss, chunk_size=chunk, backend="reference")
    dh, dw = torch.autograd.grad(loss * 1.7, (h, w))  # a scaled loss: backward must use the incoming gradient

    logits = (h @ w.t()).float()  # the formula: CE over counted targets + z_loss * mean(lse^2)
    ref_ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100)
    ref_z = (logits.logsumexp(-1)[t != -100] ** 2).mean()
    rh, rw = torch.autograd.grad((ref_ce + z_loss * ref_z) * 1.7, (h, w))
    torch.testing.assert_close(loss, (ref_ce + z_loss * ref_z).to(loss.dtype), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(z, ref_z.detach(), atol=2e-5, rtol=1e-6)
    assert dh.dtype == dtype and dw.dtype == dtype and not ce.requires_grad
    torch.testing.assert_close(dh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, rw, atol=1e-6, rtol=1e-5)
    assert dh[0, 3].abs().sum() == 0 and dh[1, 6].abs().sum() == 0  # ignored rows get no gradient
    with torch.no_grad():  # validation: the same loss, no gradient work
        torch.testing.assert_close(linear_cross_entropy(h, w, t, z_loss=z_loss, chunk_size=chunk)[0], loss.detach())


def test_linear_cross_entropy_with_nothing_labelled_is_zero_and_refuses_a_bad_backend():
    h, w = torch.randn(1, 4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss, ce, _ = linear_cross_entropy(h, w, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="not one of"):
        linear_cross_entropy(h, w, torch.zeros(1, 4, dtype=torch.long), backend="triton")
    with pytest.raises(RuntimeError, match="liger"):  # CPU tensors: Liger cannot run, and says so
        linear_cross_entropy(h, w, torch.zeros(1, 4, dtype=torch.long), backend="liger")


@pytest.mark.parametrize("objective", ["clm", "sft"])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_objective_gives_the_losses_and_gradients_of_the_logits_path(objective, tie):
    import llmzoo

    cfg = tiny_cfg(f"model.tie_embeddings={str(tie).lower()}", "block=moe" if objective == "clm" else "block=dense")
    model = llmzoo.build_model(cfg, vocab_size=97)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    make = (lambda **k: CausalLM(z_loss=1e-3, **k)) if objective == "clm" else SFT
    results = []
    for kwargs in ({}, {"fused_ce": True, "fused_chunk": 5, "fused_backend": "reference"}):
        model.zero_grad()
        out = run_objective(model, make(**kwargs), batch)
        out.value.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (plain, g_plain), (fused, g_fused) = results
    torch.testing.assert_close(fused.value, plain.value, atol=1e-6, rtol=1e-6)
    assert set(fused.metrics) == set(plain.metrics)
    for k in plain.metrics:
        a, b = plain.metrics[k], fused.metrics[k]
        torch.testing.assert_close(getattr(b, "value", b), getattr(a, "value", a), atol=1e-6, rtol=1e-6, msg=k)
    for k in g_plain:
        torch.testing.assert_close(g_fused[k], g_plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_model_without_logits_returns_hidden_and_head_weight():
    import llmzoo

    model = llmzoo.build_model(tiny_cfg(), vocab_size=50)
    ids = torch.randint(0, 50, (2, 6))
    full, bare = model(ids), model(ids, logits=False)
    assert bare.logits is None and bare.head_weight is model.head.weight
    torch.testing.assert_close(bare.hidden @ bare.head_weight.t(), full.logits)


@pytest.mark.slow  # for time: the FSDP test runs fused training end to end against full logits
def test_fused_ce_training_equals_the_logits_path(tmp_path):
    for name, extra in (("plain", []), ("fused", ["objective.fused_ce=true", "objective.fused_chunk=7"])):
        train_run("parallel=single", "data.batch_size=4", f"run_dir={tmp_path / name}",
 *PARALLEL_COMMON, *extra)
    plain, fused = logged(tmp_path / "plain"), logged(tmp_path / "fused")
    assert [s for s, _ in plain] == [s for s, _ in fused] == [0, 1]
    for (_, a), (_, b) in zip(plain, fused):
        assert abs(a - b) < 1e-5, (plain, fused)


def test_fused_ce_config_errors_name_the_keys():
    from llmzoo.config import ConfigError

    for overrides, expected in (
        (["objective.fused_ce=true", "parallel=tp", "trainer.devices=2", "parallel.tensor_parallel=2"],
         "splits the head by vocabulary"),
        (["objective.fused_ce=true", "parallel=pipeline", "trainer.devices=2"], "last stage computes only the logits"),
        (["objective.fused_backend=triton"], "objective.fused_backend='triton' is not one of"),
        (["objective.fused_chunk=0"], "objective.fused_chunk=0 must be a positive"),
        (["objective.fused_backend=liger", "objective.z_loss=0.1"], "set z_loss=0"),
    ):
        with pytest.raises(ConfigError, match=expected):
            tiny_cfg(*overrides)
    out = run_cli("llmzoo-train", "objective.fused_chunk=0", "trainer.max_steps=1", check=False)
    assert out.returncode == 2 and "objective.fused_chunk=0" in out.stderr and "Traceback" not in out.stderr
