"""Mamba-1 and Mamba-2: chunked scans vs the step-by-step recurrence, and conformance."""

import pytest
import torch

from llmzoo.testing import check_block
from llmzoo_plugins.mamba import (Mamba2Block, MambaBlock, selective_scan_fast, selective_scan_reference,
                                  ssd_chunked, ssd_reference)


def mamba1_inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, d, n = 2, 6, 4
    x = torch.randn(b, T, d, generator=g)
    dt = torch.rand(b, T, d, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) * 3
    return x, dt, A, torch.randn(b, T, n, generator=g), torch.randn(b, T, n, generator=g), torch.randn(b, d, n, generator=g)


def mamba2_inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, p, n = 2, 3, 4, 5
    return (torch.randn(b, T, h, p, generator=g), torch.rand(b, T, h, generator=g) * 0.5,
            -torch.rand(h, generator=g) * 3, torch.randn(b, T, h, n, generator=g), torch.randn(b, T, h, n, generator=g),
            torch.randn(b, h, p, n, generator=g))


@pytest.mark.parametrize("T,chunk", [(32, 8), (37, 8), (37, 5), (10, 16), (33, 1), (64, 64)])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_chunked_scan_equals_recurrence_values_and_gradients(kind, T, chunk):
    make, ref, fast = ((mamba1_inputs, selective_scan_reference, selective_scan_fast) if kind == "mamba"
                       else (mamba2_inputs, ssd_reference, ssd_chunked))
    inputs_r = [t.clone().requires_grad_() for t in make(T)]
    inputs_c = [t.clone().requires_grad_() for t in make(T)]
    yr, hr = ref(*inputs_r)
    yc, hc = fast(*inputs_c) if kind == "mamba" else fast(*inputs_c, chunk=chunk)
    torch.testing.assert_close(yc, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hc, hr, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(yr)
    ((yr * w).sum() + hr.square().sum()).backward()
    ((yc * w).sum() + hc.square().sum()).backward()
    for a, b in zip(inputs_r, inputs_c):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("block", ["mamba", "mamba2"])
@pytest.mark.parametrize("mlp", [True, False])
def test_mamba_block_conformance(block, backend, mlp):
    def make():
        if block == "mamba":
            return MambaBlock(32, d_state=8, backend=backend, mlp=mlp)
        return Mamba2Block(32, d_state=8, headdim=16, chunk_size=4, backend=backend, mlp=mlp)

    check_block(make, 32, seq_len=13)


@pytest.mark.parametrize("cls,kw", [(MambaBlock, {}), (Mamba2Block, {"headdim": 16, "chunk_size": 4})])
def test_reference_and_torch_blocks_agree(cls, kw):
    torch.manual_seed(0)
    a = cls(32, d_state=8, backend="reference", **kw)
    b = cls(32, d_state=8, backend="torch", **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 19, 32)
    torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)


def test_decode_state_is_fixed_size():
    block = Mamba2Block(32, d_state=8, headdim=16)
    short, long = block.init_state(1, 16, device=None, dtype=torch.float32), block.init_state(1, 4096, device=None,
                                                                                                 dtype=torch.float32)
    assert short.ssm.shape == long.ssm.shape and short.conv.shape == long.conv.shape


def _compiled_scan_matches_reference(T, chunk):
    from llmzoo_plugins.mamba import selective_scan_compiled

    x, dt, A, B, C, h0 = mamba1_inputs(T)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, h = selective_scan_compiled(x, dt, A, B, C, h0, chunk=chunk)
    grads = torch.autograd.grad(y.square().sum() + h.sum(), leaves)
    y_ref, h_ref = selective_scan_reference(x, dt, A, B, C, h0)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + h_ref.sum(), leaves)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 128)])
def test_compiled_scan_chunks_and_padding_equal_the_recurrence(monkeypatch, T, chunk):
    """backend=compile's chunking (the tail padded with dt = 0) and state passing, with the
    plain chunk function standing in for its compiled form (compiling takes ~30 s here;
    the slow test below compiles for real)."""
    from llmzoo_plugins import mamba

    monkeypatch.setattr(mamba, "_compiled_chunk", mamba._scan_chunk)
    _compiled_scan_matches_reference(T, chunk)


@pytest.mark.slow
def test_compiled_scan_with_inductor_equals_the_recurrence():
    _compiled_scan_matches_reference(37, 16)


def test_compile_backend_is_for_mamba1_only():
    import llmzoo
    from llmzoo.config import ConfigError

    llmzoo.compose(overrides=["model=tiny", "block=mamba", "block.backend=compile"])
    with pytest.raises(ConfigError, match="backend='compile'.*Mamba-1"):
        llmzoo.compose(overrides=["model=tiny", "block=mamba2", "block.backend=compile"])
