"""Mamba sequence mixers: ``block=mamba`` (Mamba-1, selective scan) and ``block=mamba2``
(Mamba-2, state-space duality). Both are linear recurrences over a hidden state h:

    Mamba-1  h_t = exp(dt_t * A) * h_t-1 + dt_t * B_t * x_t     A: (d_inner, n), one decay per channel and state
    Mamba-2  h_t = exp(dt_t * a) * h_t-1 + dt_t * x_t B_t^T     a: one scalar decay per head
             y_t = C_t . h_t + D * x_t

Backends (``backend:``):
  reference  the recurrence run one step at a time -- the ground truth
  torch      pure PyTorch, fast on CPU. Mamba-2: the chunked SSD form -- attention-like
             matrix products inside chunks of ``chunk_size``, states passed between
             chunks. Mamba-1: a lean step loop (one fused multiply-add per step).
  cuda       mamba_ssm's kernels (CUDA, mamba-ssm installed); used for stateless
             forwards, the torch path serves decoding
  triton     Mamba-2 only: flash-linear-attention's Triton chunked kernel (fla-core, CUDA),
             which installs without building. SSD is gated linear attention with one
             scalar gate per head: q = C, k = B, v = dt * x, log-gate = dt * a
  auto       cuda when it can run, else triton (Mamba-2), else torch
Decoding keeps a conv state (the last d_conv - 1 inputs) and the SSM state h: memory
and time per token do not grow with the context.

Packed rows (``segments``, data.packing=document): the conv sees no input of an earlier
document and the state h starts from zero at each document's first token (decay cut to 0
there; in SSD the segment sums cut at boundaries). The CUDA kernels are not used for packed
rows: they run on the torch path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.decoding import take_rows
from llmzoo.interfaces import PACKED, RECURRENT, ROW_STATE, STATEFUL, STATIC_STATE, Segments
from llmzoo.config import Rule, node_class, settings_problems
from llmzoo.layers import ResidualBlock, SwiGLU, swiglu_hidden

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "cuda", "triton", "compile")


# ============================================================================ Mamba-1 scans
# x, dt: (b, T, d); A: (d, n); B, C: (b, T, n); h: (b, d, n)

def selective_scan_reference(x, dt, A, B, C, h0=None, starts=None):
    """One step at a time: h_t = exp(dt_t A) h_t-1 + dt_t B_t x_t; y_t = h_t C_t.
    ``starts`` (b, T) bool: h_t-1 is dropped there (a packed document begins)."""
    b, T, d = x.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t, :, None].float() * A)
        if starts is not None:
            decay = decay * ~starts[:, t, None, None]
        h = decay * h + (dt[:, t] * x[:, t]).float()[:, :, None] * B[:, t, None, :].float()
        ys.append((h * C[:, t, None, :].float()).sum(-1))
    return torch.stack(ys, 1).to(x.dtype), h


def selective_scan_fast(x, dt, A, B, C, h0=None, starts=None):
    """Same result as ``selective_scan_reference``, faster on CPU: decays and inputs of
    all steps are computed at once, leaving one fused multiply-add per step.

    (Mamba-1's decay differs per channel and state, so the matmul form that makes
    Mamba-2 fast does not apply; on CPU this loop beat a parallel Hillis-Steele scan
    and a log-space cumulative sum -- see benchmarks/README.md.)
    """
    b, T, d = x.shape
    decay = torch.exp(dt.float()[..., None] * A)
    if starts is not None:  # packed documents: no state carried into a document's first token
        decay = decay * ~starts[:, :, None, None]
    decay = decay.unbind(1)  # T x (b, d, n)
    inp = ((dt * x).float()[..., None] * B.float()[:, :, None, :]).unbind(1)
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    hs = []
    for t in range(T):
        h = torch.addcmul(inp[t], decay[t], h)
        hs.append(h)
    y = torch.einsum("btdn,btn->btd", torch.stack(hs, 1), C.float())
    return y.to(x.dtype), h


def _scan_chunk(x, dt, A, B, C, h):
    """``chunk`` steps of the recurrence, written plainly: torch.compile turns the unrolled
    loop into one fused loop per element of h (the recurrence is elementwise in (d, n))."""
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


_compiled_chunk = None


def selective_scan_compiled(x, dt, A, B, C, h0=None, chunk: int = 128):
    """Same result as ``selective_scan_reference`` (``backend: compile``): the sequence in
    chunks of ``chunk`` steps, each one call of ``torch.compile``'d ``_scan_chunk`` with
    fixed shapes (the tail is padded with dt = 0, which leaves h unchanged). The first
    call compiles (tens of seconds on a CPU); decoding steps (T = 1) use the step loop."""
    global _compiled_chunk
    b, T, d = x.shape
    if T == 1:
        return selective_scan_fast(x, dt, A, B, C, h0)
    if _compiled_chunk is None:  # cpp_wrapper: C++ rather than Python glue around each call on CPU
        _compiled_chunk = torch.compile(_scan_chunk, dynamic=False, fullgraph=True,
                                        options={"cpp_wrapper": not x.is_cuda})
    L = min(chunk, T)
    pad = (-T) % L
    x, dt, B, C = (t.float() for t in (x, dt, B, C))
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    ys = []
    for s in range(0, T + pad, L):
        y, h = _compiled_chunk(x[:, s:s + L], dt[:, s:s + L], A, B[:, s:s + L], C[:, s:s + L], h)
        ys.append(y)
    return torch.cat(ys, 1)[:, :T].to(dtype=x.dtype), h


# ============================================================================ Mamba-2 scans
# x: (b, T, h, p); dt: (b, T, h); a: (h,); B, C: (b, T, h, n); state: (b, h, p, n)

def ssd_reference(x, dt, a, B, C, h0=None, starts=None):
    """One step at a time: h_t = exp(dt_t a) h_t-1 + dt_t x_t B_t^T; y_t = h_t C_t.
    ``starts`` (b, T) bool: h_t-1 is dropped there (a packed document begins)."""
    b, T, H, P = x.shape
    h = torch.zeros(b, H, P, B.shape[-1], dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t].float() * a)[:, :, None, None]
        if starts is not None:
            decay = decay * ~starts[:, t, None, None, None]
        h = decay * h + torch.einsum("bhp,bhn->bhpn", (x[:, t] * dt[:, t, :, None]).float(), B[:, t].float())
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t].float()))
    return torch.stack(ys, 1).to(x.dtype), h


def ssd_chunked(x, dt, a, B, C, h0=None, chunk: int = 64, starts=None):
    """Mamba-2's chunked SSD form; same result as ``ssd_reference``.

    Inside a chunk, y_t = sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s with cs the
    cumulative sum of dt*a (an attention-like product). Each chunk's end state is
    passed on to the next chunk, whose outputs add C_t exp(cs_t) h_in.

    ``starts`` (b, T) bool marks packed documents' first tokens: with r_t the number of
    starts in the chunk up to t, s reaches t only when r_s = r_t, the incoming state
    reaches t only when r_t = 0, and s reaches the chunk's end state only when r_s = r_end.
    """
    b, T, H, P = x.shape
    chunk = max(1, min(chunk, T))
    pad = (-T) % chunk
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, N = x.shape[1] // chunk, B.shape[-1]
    dtf = dt.float().view(b, c, chunk, H)
    xdt = x.float().view(b, c, chunk, H, P) * dtf[..., None]
    Bc, Cc = B.float().view(b, c, chunk, H, N), C.float().view(b, c, chunk, H, N)
    cs = torch.cumsum(dtf * a, dim=2)  # (b, c, l, h)
    reach = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, t, s)
    carry_in = carry_out = carry_on = None  # packed rows: what crosses no document start (b, c, l[, ...])
    if starts is not None:
        r = torch.cumsum(F.pad(starts, (0, pad)).view(b, c, chunk).long(), dim=2)
        reach = reach & (r[:, :, :, None] == r[:, :, None, :])
        carry_in, carry_out, carry_on = r == 0, r == r[:, :, -1:], r[:, :, -1] == 0
    seg = (cs[:, :, :, None, :] - cs[:, :, None, :, :]).masked_fill(~reach[..., None], float("-inf"))
    scores = torch.einsum("bcthn,bcshn->bctsh", Cc, Bc) * torch.exp(seg)
    y = torch.einsum("bctsh,bcshp->bcthp", scores, xdt)
    to_end = torch.exp(cs[:, :, -1:] - cs)
    chunk_states = torch.einsum("bcshn,bcsh,bcshp->bchpn", Bc, to_end if carry_out is None else
                                to_end * carry_out[..., None], xdt)
    h = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    h_in = []
    for i in range(c):
        h_in.append(h)
        decay = torch.exp(cs[:, i, -1]) if carry_on is None else torch.exp(cs[:, i, -1]) * carry_on[:, i, None]
        h = decay[:, :, None, None] * h + chunk_states[:, i]
    from_start = torch.exp(cs) if carry_in is None else torch.exp(cs) * carry_in[..., None]
    y = y + torch.einsum("bcthn,bchpn,bcth->bcthp", Cc, torch.stack(h_in, 1), from_start)
    return y.reshape(b, c * chunk, H, P)[:, :T].to(x.dtype), h


def ssd_fla(x, dt, a, B, C, heads_per_group: int, state=None):  # pragma: no cover - CUDA only
    """SSD through flash-linear-attention's chunked simple-GLA kernel: o_t = q_t S_t with
    S_t = exp(g_t) S_t-1 + k_t^T v_t, so q = C, k = B, v = dt * x, g = dt * a and no
    scale. x: (b, T, H, P); B, C: (b, T, G, N); the state (b, H, P, N) is fla's
    "V first" layout, read as the initial state and written back."""
    from fla.ops.simple_gla import chunk_simple_gla

    Bh, Ch = (t.repeat_interleave(heads_per_group, dim=2).to(x.dtype) for t in (B, C))
    v = (x * dt[..., None]).to(x.dtype)
    h0 = state.ssm if state is not None else None
    y, h = chunk_simple_gla(Ch, Bh, v, g=(dt * a).float(), scale=1.0, initial_state=h0,
                            output_final_state=state is not None, state_v_first=True)
    if state is not None:
        state.ssm.copy_(h.detach())
    return y


# ============================================================================ shared pieces
def mamba_problems(node: DictConfig, cfg: DictConfig) -> list[str]:
    """Config checks shared by the Mamba mixers and blocks (``check`` on each class). The
    blocks pass their mixer's settings on as ``**kwargs``, so their types are checked here."""
    whole = Rule(int, 1, nullable=True)
    problems = settings_problems(node, dict.fromkeys(("d_state", "d_conv", "expand", "headdim", "ngroups",
                                                      "chunk_size", "dt_rank"), whole), {})
    if problems:
        return problems
    mamba2 = issubclass(node_class(node) or object, (Mamba2Mixer, Mamba2Block))
    if node.get("backend", "auto") not in BACKENDS:
        problems.append(f"backend={node.get('backend')!r} is not one of {list(BACKENDS)}")
    if node.get("backend") == "triton" and not mamba2:
        problems.append("backend='triton' (fla-core's chunked kernel) is for block=mamba2 only")
    if node.get("backend") == "compile" and mamba2:
        problems.append("backend='compile' (a torch.compile'd scan) is for block=mamba (Mamba-1) only")
    if mamba2:
        inner, hd = node.get("expand", 2) * node.get("dim"), node.get("headdim", 32)
        if inner % hd:
            problems.append(f"mamba2 needs expand * dim = {inner} to be a multiple of headdim = {hd}")
        elif (inner // hd) % node.get("ngroups", 1):
            problems.append(f"ngroups={node.get('ngroups')} must divide the {inner // hd} mamba2 heads")
    if node.get("chunk_size", 1) < 1:
        problems.append(f"chunk_size must be >= 1, got {node.get('chunk_size')}")
    return problems


@dataclass
class MambaState:
    """Decode-time state: the last (d_conv - 1) conv inputs and the SSM state."""

    conv: torch.Tensor  # (B, conv_channels, d_conv - 1)
    ssm: torch.Tensor  # Mamba-1: (B, d_inner, n); Mamba-2: (B, heads, headdim, n)

    # Updated in place, so the state is already static (fixed shapes and addresses).
    def reset(self) -> None:
        self.conv.zero_(), self.ssm.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (repeats allowed), in that order (in place when the count stays)."""
        self.conv, self.ssm = take_rows(self.conv, index), take_rows(self.ssm, index)

    # Rows are independent sequences already (a recurrent state has no position), so this
    # state also serves ``init_state(..., rows=True)``.
    def put(self, row: int, other: "MambaState", other_row: int = 0) -> None:
        """Row ``row`` becomes row ``other_row`` of ``other``."""
        self.conv[row], self.ssm[row] = other.conv[other_row], other.ssm[other_row]

    def head(self, rows: int) -> "MambaState":
        """The first ``rows`` rows, sharing storage (a forward through it updates them in place)."""
        return MambaState(self.conv[:rows], self.ssm[:rows])


def causal_conv(u: torch.Tensor, conv: nn.Conv1d, state: MambaState | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv over time. u: (B, T, C) -> (B, T, C); advances state.conv.
    ``positions`` (B, T) of packed documents: the output at t takes no input from before
    its document's start (lag j counts only where positions[t] >= j)."""
    k = conv.kernel_size[0]
    if positions is not None:
        windows = F.pad(u.transpose(1, 2), (k - 1, 0)).unfold(-1, k, 1)  # (B, C, T, k): lags k-1 ... 0
        lags = torch.arange(k - 1, -1, -1, device=u.device)
        inside = (positions[:, None, :, None] >= lags).to(u.dtype)
        out = torch.einsum("bctk,ck->bct", windows * inside, conv.weight[:, 0].to(u.dtype))
        return (out + conv.bias.to(u.dtype)[:, None] if conv.bias is not None else out).transpose(1, 2)
    u = u.transpose(1, 2)
    history = state.conv if state is not None else u.new_zeros(u.shape[0], u.shape[1], k - 1)
    padded = torch.cat([history.to(u.dtype), u], dim=-1)
    if state is not None:
        state.conv.copy_(padded[..., -(k - 1):].detach())
    return conv(padded).transpose(1, 2)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def sample_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """Initial time steps, log-uniform in [dt_min, dt_max] (Mamba's init)."""
    return torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))


def _linear_flops(*linears: nn.Linear) -> float:
    return sum(2 * m.in_features * m.out_features for m in linears)


# What the optional kernels' libraries offer, found once, outside torch.compile (whose
# tracing cannot import a module that fails): {check: result}.
_FOUND: dict[str, bool] = {}


def _found(key: str, probe) -> bool:
    if key not in _FOUND:
        if torch.compiler.is_compiling():
            return False
        try:
            _FOUND[key] = bool(probe())
        except Exception:  # noqa: BLE001 - missing, built without CUDA, or no Triton
            _FOUND[key] = False
    return _FOUND[key]


def _probe_mamba_ssm() -> bool:
    import mamba_ssm  # noqa: F401

    return torch.cuda.is_available()


def _probe_fla() -> bool:
    from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401

    return True


def _probe_fla_backward() -> bool:
    """fla-core refuses its gated backward on Hopper GPUs with Triton >= 3.4, < 3.7.1
    (wrong results, fla issue #640) unless tilelang is installed."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return True
    import tilelang  # noqa: F401

    return True


def _mamba_ssm_available() -> bool:
    return _found("mamba_ssm", _probe_mamba_ssm)


def _fla_available() -> bool:
    return _found("fla", _probe_fla)


def _fla_backward_ok() -> bool:
    return _found("fla_backward", _probe_fla_backward)


def pick_backend(requested: str, x: torch.Tensor, stateless: bool, triton: bool = False) -> str:
    """The backend for this call. ``triton``: the mixer has a Triton path (Mamba-2),
    used for training only where fla's backward is sound on this GPU and Triton."""
    cuda_ok = x.is_cuda and _mamba_ssm_available()
    triton_ok = triton and x.is_cuda and _fla_available()
    if requested == "cuda" and not cuda_ok:
        raise RuntimeError("mamba backend 'cuda' needs mamba-ssm installed and CUDA tensors; use backend=auto")
    if requested == "triton" and not triton_ok:
        raise RuntimeError("mamba backend 'triton' is for block=mamba2 and needs fla-core installed and CUDA "
                           "tensors; use backend=auto")
    if triton_ok and torch.is_grad_enabled() and x.requires_grad and not _fla_backward_ok():
        if requested == "triton":
            raise RuntimeError("mamba backend 'triton' cannot train here: fla-core's gated backward gives wrong "
                               "results with Triton < 3.7.1 on Hopper GPUs (upgrade Triton or install tilelang); "
                               "use backend=auto, which trains with the torch path and decodes with triton")
        triton_ok = False
    if requested == "auto" and cuda_ok and stateless:
        return "cuda"
    if requested in ("auto", "cuda") and triton_ok:
        return "triton"
    if requested in ("auto", "cuda"):
        return "torch"
    return requested


# ============================================================================ Mamba-1
class MambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer. (B, T, D) -> (B, T, D)."""

    check = staticmethod(mamba_problems)
    capabilities = frozenset({RECURRENT, STATEFUL, STATIC_STATE, ROW_STATE, PACKED})

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 backend: str = "auto", layer_idx: int = 0):
        super().__init__()
        self.d_inner, self.d_state = expand * dim, d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.backend, self.layer_idx, self._logged = backend, layer_idx, False
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.out_proj.residual_out = True
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        self.dt_proj.bias.copy_(inverse_softplus(sample_dt(self.d_inner)))

    def forward(self, x: torch.Tensor, *, state: MambaState | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        positions = segments.positions if segments is not None else None
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(causal_conv(xs, self.conv1d, state, positions))
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        backend = pick_backend(self.backend, x, state is None)
        if positions is not None:  # packed documents: the step loops reset h at each start
            scan = selective_scan_reference if backend == "reference" else selective_scan_fast
            y, _ = scan(xs, dt, A, B, C, starts=positions == 0)
            return self.out_proj((y + xs * self.D.to(xs.dtype)) * F.silu(z))
        if not self._logged and self.layer_idx == 0:
            log.info("mamba backend: %s (requested %s)", backend, self.backend)
            self._logged = True
        h0 = state.ssm if state is not None else None
        if backend == "reference":
            y, h = selective_scan_reference(xs, dt, A, B, C, h0)
        elif backend == "cuda":  # pragma: no cover - CUDA only, see tests/gpu
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            y = selective_scan_fn(xs.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2).contiguous(),
                                  C.transpose(1, 2).contiguous()).transpose(1, 2)
            h = None
        elif backend == "compile":
            y, h = selective_scan_compiled(xs, dt, A, B, C, h0)
        else:
            y, h = selective_scan_fast(xs, dt, A, B, C, h0)
        if state is not None:
            state.ssm.copy_(h.detach())
        y = (y + xs * self.D.to(xs.dtype)) * F.silu(z)
        return self.out_proj(y)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, the depthwise conv and the read-out h.C (the scan itself is elementwise)."""
        return _linear_flops(self.in_proj, self.x_proj, self.dt_proj, self.out_proj) \
            + 2 * self.conv1d.kernel_size[0] * self.d_inner + 2 * self.d_inner * self.d_state

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None, static: bool = False,
                   rows: bool = False) -> MambaState:
        k = self.conv1d.kernel_size[0]
        return MambaState(torch.zeros(batch_size, self.d_inner, k - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32))


# ============================================================================ Mamba-2
class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: rmsnorm(y * silu(z)) * weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y * F.silu(z)).float()
        return F.rms_norm(g, (g.shape[-1],), self.weight.float(), self.eps).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) mixer with multi-head scalar decays. (B, T, D) -> (B, T, D)."""

    check = staticmethod(mamba_problems)
    capabilities = frozenset({RECURRENT, STATEFUL, STATIC_STATE, ROW_STATE, PACKED})

    def __init__(self, dim: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 32,
                 ngroups: int = 1, chunk_size: int = 64, backend: str = "auto", layer_idx: int = 0):
        super().__init__()
        self.d_inner = expand * dim
        if self.d_inner % headdim:
            raise ValueError(f"mamba2: expand * dim = {self.d_inner} is not a multiple of headdim = {headdim}")
        self.nheads, self.headdim, self.d_state, self.ngroups = self.d_inner // headdim, headdim, d_state, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"mamba2: ngroups = {ngroups} does not divide the {self.nheads} heads")
        self.chunk_size, self.backend, self.layer_idx, self._logged = chunk_size, backend, layer_idx, False
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.out_proj.residual_out = True
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        self.dt_bias.copy_(inverse_softplus(sample_dt(self.nheads)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, *, state: MambaState | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        b, T, _ = x.shape
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        positions = segments.positions if segments is not None else None
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC = F.silu(causal_conv(xBC, self.conv1d, state, positions))
        xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(b, T, H, P)
        B, C = B.reshape(b, T, G, N), C.reshape(b, T, G, N)
        dt = F.softplus(dt + self.dt_bias)
        a = -torch.exp(self.A_log.float())
        backend = pick_backend(self.backend, x, state is None, triton=True)
        if positions is not None:  # packed documents: the torch scans, cut at each start
            backend = "reference" if backend == "reference" else "torch"
        if not self._logged and self.layer_idx == 0:
            log.info("mamba2 backend: %s (requested %s)", backend, self.backend)
            self._logged = True
        if backend == "cuda":  # pragma: no cover - CUDA only, see tests/gpu
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            y = mamba_chunk_scan_combined(xs, dt, a, B, C, chunk_size=self.chunk_size)
        elif backend == "triton" and T > 1:  # pragma: no cover - CUDA only, see tests/gpu
            y = ssd_fla(xs, dt, a, B, C, H // G, state)
        else:
            Bh, Ch = (t.repeat_interleave(H // G, dim=2) for t in (B, C))
            h0 = state.ssm if state is not None else None
            step_by_step = backend == "reference" or T == 1  # one decode step: the recurrence is cheapest
            scan = ssd_reference if step_by_step else ssd_chunked
            kw = {} if step_by_step else {"chunk": self.chunk_size}
            y, h = scan(xs, dt, a, Bh, Ch, h0, starts=None if positions is None else positions == 0, **kw)
            if state is not None:
                state.ssm.copy_(h.detach())
        y = y + xs * self.D.to(xs.dtype)[:, None]
        return self.out_proj(self.norm(y.reshape(b, T, self.d_inner), z))

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, the conv, and SSD's matrix products: C.B and the diagonal-block
        output over a chunk of l = min(chunk_size, seq_len) tokens, plus the chunk
        states and their read-out (each 2 * heads * headdim * d_state). The SSD part
        runs on the sequence padded to whole chunks, and that work counts."""
        l, H, P, N = min(self.chunk_size, seq_len), self.nheads, self.headdim, self.d_state
        padded = -(-seq_len // l) * l
        ssd = (2 * l * H * (N + P) + 4 * H * P * N) * padded / seq_len
        return _linear_flops(self.in_proj, self.out_proj) + 2 * self.conv1d.kernel_size[0] * self.conv_dim + ssd

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None, static: bool = False,
                   rows: bool = False) -> MambaState:
        k = self.conv1d.kernel_size[0]
        return MambaState(
            torch.zeros(batch_size, self.conv_dim, k - 1, device=device, dtype=dtype),
            torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32))


# ============================================================================ blocks
class MambaBlock(ResidualBlock):
    """x + Mamba(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) when ``mlp`` is true."""

    check = staticmethod(mamba_problems)
    capabilities = MambaMixer.capabilities
    mixer_class = MambaMixer

    def __init__(self, dim: int, mlp: bool = True, ffn_hidden: int | None = None, norm_eps: float = 1e-5,
                 layer_idx: int = 0, **mixer_kwargs):
        mixer = self.mixer_class(dim, layer_idx=layer_idx, **mixer_kwargs)
        super().__init__(mixer, SwiGLU(dim, swiglu_hidden(dim, ffn_hidden)) if mlp else None, dim, norm_eps)


class Mamba2Block(MambaBlock):
    capabilities = Mamba2Mixer.capabilities
    mixer_class = Mamba2Mixer
