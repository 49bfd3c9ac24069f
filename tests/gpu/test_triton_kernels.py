"""Triton fast paths against the PyTorch references (CUDA only): Liger's RMSNorm,
SwiGLU and RoPE (kernels=liger), its fused linear cross-entropy (objective.fused_ce=true)
and fla-core's chunked kernel for Mamba-2 (backend=triton)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import llmzoo  # noqa: E402
from llmzoo.testing import check_kernels, check_stateful_decode  # noqa: E402


def _model(dtype):
    cfg = llmzoo.compose(overrides=["model=tiny", "block=dense", "model.vocab_size=64"])
    torch.manual_seed(0)
    return llmzoo.build_model(cfg).cuda().to(dtype)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_liger_kernels_match_the_references(dtype, atol):
    pytest.importorskip("liger_kernel")
    from llmzoo_plugins.kernels import Liger

    ids = torch.randint(0, 64, (2, 48), device="cuda")
    check_kernels(Liger(backend="liger"), _model(dtype), ids, atol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_liger_fused_linear_cross_entropy_matches_the_chunked_reference(dtype, atol):
    pytest.importorskip("liger_kernel")
    from llmzoo.shared.losses import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3, 100, 256, generator=g, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(5000, 256, generator=g, device="cuda") * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, 5000, (3, 100), generator=g, device="cuda")
    t[:, :20] = -100
    results = []
    for backend in ("reference", "liger"):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, chunk_size=64, backend=backend)[0]
        loss.backward()
        results.append((loss.float(), h.grad.float(), w.grad.float()))
    (ref, rh, rw), (fast, fh, fw) = results
    torch.testing.assert_close(fast, ref, atol=atol, rtol=atol)
    scale = max(rh.abs().max().item(), rw.abs().max().item())
    torch.testing.assert_close(fh, rh, atol=atol * scale, rtol=atol)
    torch.testing.assert_close(fw, rw, atol=atol * scale, rtol=atol)


def test_liger_kernels_are_used_on_cuda(monkeypatch):
    pytest.importorskip("liger_kernel")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    from llmzoo_plugins.kernels import Liger

    calls = []
    original = LigerRMSNormFunction.apply
    monkeypatch.setattr(LigerRMSNormFunction, "apply", lambda *a: calls.append(1) or original(*a))
    model = Liger(backend="liger").apply(_model(torch.float32))
    model(torch.randint(0, 64, (1, 8), device="cuda"))
    assert len(calls) == 2 * len(model.blocks) + 1  # two norms per block and the final one


def _mamba2_pair(dtype):
    from llmzoo_plugins.mamba import Mamba2Mixer

    torch.manual_seed(0)
    ref = Mamba2Mixer(256, d_state=64, headdim=32, ngroups=2, backend="torch").cuda().to(dtype)
    fast = Mamba2Mixer(256, d_state=64, headdim=32, ngroups=2, backend="triton").cuda().to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _close(a, b, atol):
    scale = b.float().abs().max()
    torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_mamba2_triton_forward_matches_chunked_torch(dtype, atol):
    pytest.importorskip("fla")
    ref, fast = _mamba2_pair(dtype)
    x = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        _close(fast(x), ref(x), atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_mamba2_triton_gradients_match_chunked_torch(dtype, atol):
    pytest.importorskip("fla")
    from llmzoo_plugins.mamba import _fla_backward_ok

    if not _fla_backward_ok():
        pytest.skip("fla-core refuses its gated backward with Triton < 3.7.1 on Hopper (fla #640)")
    ref, fast = _mamba2_pair(dtype)
    x = torch.randn(2, 300, 256, device="cuda", dtype=dtype, requires_grad=True)
    grads = []
    for m in (fast, ref):
        y = m(x)
        grads.append([y, *torch.autograd.grad(y.float().square().mean(), [x, m.in_proj.weight, m.A_log])])
    for a, b in zip(*grads):
        _close(a, b, atol)


def test_mamba2_auto_trains_with_torch_where_fla_backward_is_unsound():
    pytest.importorskip("fla")
    from llmzoo_plugins.mamba import _fla_backward_ok, pick_backend

    x = torch.zeros(1, 8, 4, device="cuda", requires_grad=True)
    expected = "triton" if _fla_backward_ok() else "torch"
    assert pick_backend("auto", x, stateless=True, triton=True) in (expected, "cuda")
    with torch.no_grad():
        assert pick_backend("auto", x, stateless=True, triton=True) in ("triton", "cuda")


def test_mamba2_triton_prefill_then_decode_equals_full_forward():
    pytest.importorskip("fla")
    from llmzoo_plugins.mamba import Mamba2Block

    torch.manual_seed(0)
    block = Mamba2Block(128, d_state=32, headdim=32, backend="triton").cuda()
    with torch.no_grad():
        # one prefill length and single tokens: each new length costs fla a Triton compile (~35 s)
        check_stateful_decode(block, dim=128, seq_len=12, atol=2e-3, chunks=(1,))


def test_fused_ce_objective_on_cuda_under_autocast_matches_the_logits_path():
    """objective.fused_ce=true on CUDA (Liger's kernel, bf16 autocast as trainer=gpu runs it):
    loss and head / embedding gradients within bf16 rounding of the logits path."""
    pytest.importorskip("liger_kernel")
    from llmzoo.losses import run_objective
    from llmzoo_plugins.clm import CausalLM

    model = _model(torch.float32)
    ids = torch.randint(0, 64, (4, 48), device="cuda")
    grads, losses = [], []
    for objective in (CausalLM(), CausalLM(fused_ce=True, fused_backend="liger")):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run_objective(model, objective, {"input_ids": ids}).value
        loss.backward()
        losses.append(loss.float())
        grads.append({k: p.grad.float().clone() for k, p in model.named_parameters() if k in ("head.weight",
                                                                                             "embedding.weight")})
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    for k in grads[0]:
        scale = grads[0][k].abs().max().item()
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=3e-2 * scale, rtol=3e-2, msg=k)
