"""Mixture-of-Experts: dispatch vs the dense formula, the losses vs their formulas, capacity."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmzoo.testing import check_block
from llmzoo_plugins.attention import Attention
from llmzoo_plugins.moe import MoE, MoEBlock, capacity_keep, route

DIM = 32


def make_moe(**kw):
    torch.manual_seed(0)
    return MoE(DIM, **{"n_experts": 8, "top_k": 2, "hidden": 48, **kw})


@pytest.mark.parametrize("gating", ["softmax", "softmax_norm", "sigmoid"])
@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("backend", ["torch", "gather"])
def test_fast_backends_equal_reference_outputs_and_gradients(gating, n_shared, backend):
    ref = make_moe(gating=gating, n_shared=n_shared, backend="reference")
    fast = make_moe(gating=gating, n_shared=n_shared, backend=backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(1))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    torch.testing.assert_close(yf, yr, atol=1e-5, rtol=1e-5)
    (yr.square().sum() + ref.aux_loss()).backward()
    (yf.square().sum() + fast.aux_loss()).backward()
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-4)
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_routing_weights_follow_the_gating_formulas():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, e, p = route(logits, 2, "softmax")
    sm = logits.softmax(-1)
    assert e.tolist() == [[0, 1]] and torch.allclose(w, sm[:, :2])
    w, _, _ = route(logits, 2, "softmax_norm")
    assert torch.allclose(w, sm[:, :2] / sm[:, :2].sum())
    w, _, _ = route(logits, 2, "sigmoid")
    sg = torch.sigmoid(logits[:, :2])
    assert torch.allclose(w, sg / sg.sum())


def test_balance_and_z_loss_equal_the_formulas():
    moe = make_moe(backend="torch", balance_loss_weight=0.3, z_loss_weight=0.07)
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(2))
    moe(x)
    logits = x @ moe.router.weight.T
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    # Switch: N * sum_e (fraction of assignments to e) * (mean prob of e), written out
    frac = [sum(int(t in row) for row in top.tolist() for t in [e]) / (40 * 2) for e in range(8)]
    balance = 8 * sum(frac[e] * probs[:, e].mean().item() for e in range(8))
    z = sum(torch.logsumexp(logits[i], 0).item() ** 2 for i in range(40)) / 40
    assert abs(moe.aux_loss().item() - (0.3 * balance + 0.07 * z)) < 1e-5
    assert abs(moe.metrics()["moe/balance_loss"].item() - balance) < 1e-5


def test_capacity_factor_drops_and_counts_the_right_tokens():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0]])
    keep = capacity_keep(experts, 4, capacity=2)
    # expert 0 is chosen by tokens 0,1,2,3,4: only the first two keep it; expert 1 by 0,2,4
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False], [False, False]]

    moe = make_moe(backend="torch", capacity_factor=0.5).train()
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(3))
    y = moe(x)
    _, experts, _ = route(x @ moe.router.weight.T, 2, "softmax_norm")
    cap = math.ceil(0.5 * 64 * 2 / 8)
    counts = torch.bincount(experts.flatten(), minlength=8)
    assert moe.metrics()["moe/dropped_tokens"].value.item() == (counts - cap).clamp(min=0).sum().item() > 0
    # a token whose both assignments were dropped gets exactly zero from the experts
    keep = capacity_keep(experts, 8, cap)
    dead = ~keep.any(-1)
    assert dead.any() and torch.all(y[dead] == 0)
    moe.eval()  # evaluation is dropless, and computes no auxiliary loss
    dropless = make_moe(backend="torch").eval()
    dropless.load_state_dict(moe.state_dict())
    torch.testing.assert_close(moe(x), dropless(x))
    assert moe.aux_loss() is None and not torch.equal(moe(x), y)


def test_moe_block_conformance():
    def make():
        return MoEBlock(DIM, Attention(DIM, 4, 2, 64), n_experts=4, top_k=2, hidden=32, backend="torch")

    check_block(make, DIM)


def test_switch_loss_is_minimal_for_uniform_routing():
    from llmzoo_plugins.moe import switch_balance_loss

    probs = torch.full((16, 4), 0.25)
    experts = torch.arange(16).remainder(4)[:, None]
    assert abs(switch_balance_loss(probs, experts, 4).item() - 1.0) < 1e-6
    skew = F.one_hot(torch.zeros(16, dtype=torch.long), 4).float()
    assert switch_balance_loss(skew, torch.zeros(16, 1, dtype=torch.long), 4).item() == pytest.approx(4.0)


def test_auto_backend_gathers_for_decode_steps_and_sorts_for_long_inputs():
    moe = make_moe(backend="auto").eval()
    assert moe.pick_backend(1) == "gather" and moe.pick_backend(4) == "gather"  # 4 tokens x top-2 <= 8 experts
    assert moe.pick_backend(5) == "torch"
