"""Conformance checks for blocks, the same ones llmzoo runs on its own plugins.

A third-party author runs them on a factory that builds their block::

    from llmzoo.testing import check_block
    check_block(lambda: MyBlock(dim=32, layer_idx=0), dim=32)

Each check raises AssertionError with a message saying what differs and by how much.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

BlockFactory = Callable[[], nn.Module]


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def check_causality(block: nn.Module, dim: int, seq_len: int = 16, batch: int = 2) -> None:
    """Changing the input at position t changes no output before t."""
    block.eval()
    x = _randn(batch, seq_len, dim)
    y = block(x)
    assert y.shape == x.shape, f"block output shape {tuple(y.shape)} != input shape {tuple(x.shape)}"
    for t in (0, seq_len // 2, seq_len - 1):
        x2 = x.clone()
        x2[:, t] += _randn(batch, dim, seed=t + 1)
        y2 = block(x2)
        if t > 0:
            d = _max_diff(y[:, :t], y2[:, :t])
            # 1e-6, not 0: a block that groups tokens (MoE) may round differently when later
            # tokens change (seen at 7e-9 on some CPUs); a real leak moves outputs by ~1e-2
            assert d <= 1e-6, f"not causal: changing position {t} changed earlier outputs by {d:.3g}"
        assert _max_diff(y[:, t:], y2[:, t:]) > 0, f"changing position {t} changed nothing at or after it"


@torch.no_grad()
def check_stateful_decode(block: nn.Module, dim: int, seq_len: int = 16, batch: int = 2,
                          atol: float = 1e-5, chunks: tuple[int, ...] = (1, 3)) -> None:
    """Feeding the sequence in pieces through ``init_state`` equals one full forward (fp32)."""
    block.eval()
    x = _randn(batch, seq_len, dim, seed=7)
    full = block(x)
    for chunk in chunks:
        state = block.init_state(batch, seq_len, device=x.device, dtype=x.dtype)
        assert state is not None, "init_state returned None: a block without state cannot decode incrementally"
        parts = [block(x[:, i:i + chunk], state=state) for i in range(0, seq_len, chunk)]
        d = _max_diff(torch.cat(parts, dim=1), full)
        assert d <= atol, f"stateful decode in pieces of {chunk} differs from the full forward by {d:.3g} > {atol}"


@torch.no_grad()
def check_static_decode(block: nn.Module, dim: int, seq_len: int = 16, batch: int = 2, atol: float = 1e-5) -> None:
    """For blocks with ``static_state``: a state from ``init_state(..., static=True)`` keeps
    its tensors (same objects, shapes and storage) while decoding, gives the full
    forward's outputs, and after ``reset()`` decodes the same again."""
    block.eval()
    x = _randn(batch, seq_len, dim, seed=8)
    full = block(x)
    state = block.init_state(batch, seq_len + 4, device=x.device, dtype=x.dtype, static=True)
    assert hasattr(state, "reset"), "a static state needs reset()"
    tensors = {n: (t, t.shape, t.data_ptr()) for n, t in vars(state).items() if isinstance(t, torch.Tensor)}
    for attempt in range(2):
        prefill = seq_len // 2
        parts = [block(x[:, :prefill], state=state)] + [block(x[:, i:i + 1], state=state) for i in range(prefill, seq_len)]
        d = _max_diff(torch.cat(parts, dim=1), full)
        assert d <= atol, f"static-state decode (attempt {attempt}) differs from the full forward by {d:.3g} > {atol}"
        for n, (t, shape, ptr) in tensors.items():
            now = getattr(state, n)
            assert now is t and now.shape == shape and now.data_ptr() == ptr, \
                f"static state field {n!r} was replaced or resized: update it in place"
        state.reset()


@torch.no_grad()
def check_state_dict_roundtrip(make_block: BlockFactory, dim: int, seq_len: int = 8) -> None:
    """A fresh block given another's state_dict computes the same outputs."""
    torch.manual_seed(1)
    a = make_block().eval()
    torch.manual_seed(2)
    b = make_block().eval()
    x = _randn(2, seq_len, dim, seed=3)
    missing = b.load_state_dict(a.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, str(missing)
    d = _max_diff(a(x), b(x))
    assert d == 0.0, f"state_dict round trip changed outputs by {d:.3g}"


@torch.no_grad()
def check_dtype_move(block: nn.Module, dim: int, seq_len: int = 8, atol: float = 1e-4) -> None:
    """``block.to(float64)`` (and to CUDA when present) runs and agrees with float32,
    statefully too."""
    block.eval()
    x = _randn(2, seq_len, dim, seed=4)
    ref = block(x)
    targets: list[tuple[Any, torch.dtype, float]] = [("cpu", torch.float64, atol)]
    if torch.cuda.is_available():
        targets.append(("cuda", torch.float32, 1e-3))
    for device, dtype, tol in targets:
        moved = copy.deepcopy(block).to(device=device, dtype=dtype)
        xm = x.to(device=device, dtype=dtype)
        y = moved(xm)
        assert y.dtype == dtype and y.device.type == device, f"output is {y.dtype} on {y.device}, expected {dtype} on {device}"
        d = _max_diff(y.cpu(), ref)
        assert d <= tol, f"block on {device}/{dtype} differs from float32 CPU by {d:.3g} > {tol}"
        state = moved.init_state(2, seq_len, device=torch.device(device), dtype=dtype)
        if state is not None:
            steps = torch.cat([moved(xm[:, i:i + 1], state=state) for i in range(seq_len)], dim=1)
            d = _max_diff(steps.cpu(), ref)
            assert d <= tol, f"stateful decode on {device}/{dtype} differs by {d:.3g} > {tol}"


def check_gradients(block: nn.Module, dim: int, seq_len: int = 8) -> None:
    """Every parameter receives a finite gradient from a full forward."""
    block.train()
    x = _randn(2, seq_len, dim, seed=5).requires_grad_(True)
    block(x).square().mean().backward()
    for name, p in block.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"parameter {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"parameter {name} has a non-finite gradient"
    block.zero_grad(set_to_none=True)


def check_block(make_block: BlockFactory, dim: int, *, seq_len: int = 16, atol: float = 1e-5) -> None:
    """Run every conformance check on blocks built by ``make_block`` (a no-argument factory)."""
    torch.manual_seed(0)
    block = make_block()
    assert isinstance(getattr(block, "capabilities", None), frozenset), "block.capabilities must be a frozenset"
    check_causality(block, dim, seq_len)
    if block.init_state(1, 1, device=None, dtype=None) is not None:
        check_stateful_decode(block, dim, seq_len, atol=atol)
    if "static_state" in block.capabilities:
        check_static_decode(block, dim, seq_len, atol=atol)
    check_state_dict_roundtrip(make_block, dim)
    check_dtype_move(block, dim)
    check_gradients(block, dim)


@torch.no_grad()
def check_model_decode(model: nn.Module, ids: torch.Tensor, prefill: int, atol: float = 1e-5) -> None:
    """A whole LanguageModel: prefill ``prefill`` tokens, then one token at a time through
    ``init_states``; the logits must equal one full forward. ids: (B, T) token ids."""
    model.eval()
    B, T = ids.shape
    full = model(ids).logits
    states = model.init_states(B, T)
    steps = [model(ids[:, :prefill], states=states).logits]
    steps += [model(ids[:, t:t + 1], states=states).logits for t in range(prefill, T)]
    d = _max_diff(torch.cat(steps, 1), full)
    assert d <= atol, f"model decode (prefill {prefill}, then single tokens) differs from the full forward by {d:.3g}"
