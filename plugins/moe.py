"""Mixture-of-Experts channel mixer (``block=moe``): a router picks top-k of N SwiGLU
experts per token; optional always-on shared experts; load-balancing and router
z-losses returned through ``aux_loss``.

Routing (``gating:``):
  softmax      weights = top-k of softmax(logits)            (Switch / Mixtral without renorm)
  softmax_norm top-k of softmax(logits), renormalised to 1   (Mixtral)
  sigmoid      top-k of sigmoid(logits), renormalised to 1   (DeepSeek-V3 style)

Backends (``backend:``):
  reference  every expert on every token, weighted by the (mostly zero) gate:
             y = sum_e g_e(x) * expert_e(x) -- the formula itself, the ground truth
  torch      dropless dispatch: assignments sorted by expert, each expert run on its
             contiguous slice (one ``torch._grouped_mm`` call where torch has it)
  gather     each assignment gathers its expert's weights and runs a batched matmul:
             reads only the chosen experts and keeps every shape static (decoding,
             compiled decode steps); wasteful for many tokens
  auto       gather when there are no more assignments than experts (a decode step)
             or for up to 64 tokens in a compiled evaluation forward (a Medusa tree), else
             torch (a megablocks dMoE backend is not wired in yet)

``capacity_factor`` (training only; evaluation and decoding are always dropless, which
keeps the block causal): each expert takes at most ceil(cf * tokens * k / N) assignments,
in token order; the rest are dropped and counted.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from llmzoo.config import target_class
from llmzoo.interfaces import PACKED, TENSOR_PARALLEL, Segments, capabilities_of, summed
from llmzoo.layers import ResidualBlock, SwiGLU, swiglu_hidden

log = logging.getLogger(__name__)

GATINGS = ("softmax", "softmax_norm", "sigmoid")
BACKENDS = ("auto", "reference", "torch", "gather")


def route(logits: torch.Tensor, top_k: int, gating: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E) -> (weights (N, k), experts (N, k), probs (N, E)) in float32."""
    logits = logits.float()
    scores = torch.sigmoid(logits) if gating == "sigmoid" else logits.softmax(-1)
    weights, experts = scores.topk(top_k, dim=-1)
    if gating in ("softmax_norm", "sigmoid"):
        weights = weights / weights.sum(-1, keepdim=True)
    probs = logits.softmax(-1)  # the balance loss always uses softmax probabilities
    return weights, experts, probs


def switch_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's loss: N * sum_e f_e * P_e, f_e the fraction of the top-k
    assignments that go to expert e and P_e the mean router probability of e."""
    f = torch.bincount(experts.flatten(), minlength=n_experts).float() / experts.numel()
    return n_experts * (f * probs.mean(0)).sum()


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) bool: True for assignments within their expert's capacity, first come first
    served in token order (then by rank within a token)."""
    flat = experts.flatten()  # token-major order
    onehot = F.one_hot(flat, n_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of this assignment inside its expert
    return (position < capacity).view_as(experts)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """torch._grouped_mm (one call for all experts) runs fp32 on CPU and bf16 on CUDA."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32) or (x.is_cuda and x.dtype == torch.bfloat16)


def moe_problems(node: DictConfig, cfg: DictConfig) -> list[str]:
    """Config checks shared by ``MoE`` and ``MoEBlock`` (``check`` on each class)."""
    problems = []
    e, k = node.get("n_experts"), node.get("top_k")
    if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
        problems.append(f"top_k={k} must be between 1 and n_experts={e}")
    if node.get("gating") not in GATINGS:
        problems.append(f"gating={node.get('gating')!r} is not one of {list(GATINGS)}")
    if node.get("backend") not in BACKENDS:
        problems.append(f"backend={node.get('backend')!r} is not one of {list(BACKENDS)}")
    cf = node.get("capacity_factor")
    if cf is not None and not (isinstance(cf, (int, float)) and cf > 0):
        problems.append(f"capacity_factor must be null (dropless) or > 0, got {cf!r}")
    return problems


class MoE(nn.Module):
    """(B, T, D) -> (B, T, D). Experts are SwiGLU MLPs stored as stacked weights."""

    check = staticmethod(moe_problems)
    capabilities = frozenset({PACKED})  # told of packed rows: its aux losses skip padding

    def __init__(self, dim: int, n_experts: int = 8, top_k: int = 2, hidden: int | None = None,
                 n_shared: int = 0, gating: str = "softmax_norm", capacity_factor: float | None = None,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 1e-3, backend: str = "auto"):
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"moe gating {gating!r} is not one of {GATINGS}")
        if backend not in BACKENDS:
            raise ValueError(f"moe backend {backend!r} is not one of {BACKENDS}")
        self.n_experts, self.top_k, self.gating = n_experts, top_k, gating
        self.capacity_factor, self.backend, self.backends_used = capacity_factor, backend, set()
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.hidden = hidden = swiglu_hidden(dim, hidden)
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.shared = SwiGLU(dim, hidden * n_shared) if n_shared else None
        self._aux: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.reset_extra_parameters()

    def reset_extra_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, std)

    # --------------------------------------------------------------------- experts
    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down[e]

    def experts_reference(self, x, weights, experts):
        gates = torch.zeros(x.shape[0], self.n_experts, dtype=weights.dtype, device=x.device)
        gates.scatter_add_(1, experts, weights)  # (N, E), zero for experts not chosen
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            out = out + gates[:, e:e + 1].to(x.dtype) * self.expert(e, x)
        return out

    def experts_torch(self, x, weights, experts):
        """Dropless dispatch: sort assignments by expert, run each expert on its slice."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat, minlength=self.n_experts)
        xs = x[token]
        if _grouped_mm_ok(xs):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.w_gate_up, offs=offs).chunk(2, dim=-1)
            ys = torch._grouped_mm(F.silu(gate) * up, self.w_down, offs=offs)
        else:
            ys = torch.cat([self.expert(e, part) for e, part in enumerate(xs.split(counts.tolist()))])
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def experts_gather(self, x, weights, experts):
        """Per assignment: y = w_down[e]^T (silu(gate) * up) with w = the chosen expert's weights."""
        flat = experts.flatten()
        xs = x.repeat_interleave(self.top_k, dim=0)[:, None, :]  # (N*k, 1, D)
        gate, up = torch.bmm(xs, self.w_gate_up[flat]).chunk(2, dim=-1)
        ys = torch.bmm(F.silu(gate) * up, self.w_down[flat])[:, 0]  # (N*k, D)
        ys = ys * weights.flatten()[:, None].to(ys.dtype)
        return ys.view(x.shape[0], self.top_k, -1).sum(1)

    def pick_backend(self, n_tokens: int) -> str:
        if self.backend != "auto":
            return self.backend
        if torch.compiler.is_compiling() and not self.training and n_tokens <= 64:
            return "gather"  # fixed shapes for a compiled decode step of several tokens (a Medusa tree)
        return "gather" if n_tokens * self.top_k <= self.n_experts else "torch"

    # --------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, segments: Segments | None = None) -> torch.Tensor:
        """Packed rows (``segments``): routing is per token as ever; the balance and z losses
        and the load figures count real tokens only (not padding, doc id -1)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        weights, experts, probs = route(logits, self.top_k, self.gating)
        dropped = torch.zeros((), device=x.device)
        if self.capacity_factor and self.training:
            capacity = math.ceil(self.capacity_factor * x.shape[0] * self.top_k / self.n_experts)
            keep = capacity_keep(experts, self.n_experts, capacity)
            weights = weights * keep
            dropped = (~keep).sum()
        backend = self.pick_backend(x.shape[0])
        if not torch.compiler.is_compiling() and backend not in self.backends_used:  # no guard on the set
            self.backends_used.add(backend)
            log.info("moe backend: %s (requested %s, %d tokens)", backend, self.backend, x.shape[0])
        out = getattr(self, f"experts_{backend}")(x, weights, experts)
        if self.shared is not None:
            out = out + self.shared(x)
        if not self.training:  # evaluation and decoding: no auxiliary losses or statistics to pay for
            self._aux, self.stats = None, {}
            return out.reshape(shape)
        if segments is not None:
            real = segments.doc_ids.flatten() >= 0
            probs, experts, logits = probs[real], experts[real], logits[real]
        balance = switch_balance_loss(probs, experts, self.n_experts)
        z = logits.float().logsumexp(-1).square().mean()
        self._aux = self.balance_loss_weight * balance + self.z_loss_weight * z
        load = torch.bincount(experts.flatten(), minlength=self.n_experts).float() / experts.numel()
        self.stats = {"moe/balance_loss": balance.detach(), "moe/router_z_loss": z.detach(),
                      "moe/dropped_tokens": summed(dropped.detach().float()), "moe/max_expert_load": load.max().detach(),
                      **{f"moe/load_e{e}": load[e].detach() for e in range(self.n_experts)}}
        return out.reshape(shape)

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux

    def flops_per_token(self, seq_len: int) -> float:
        """Router plus the top_k active experts (and the shared ones)."""
        dim = self.router.in_features
        shared = self.shared.flops_per_token(seq_len) if self.shared is not None else 0
        return 2 * dim * self.n_experts + self.top_k * 6 * dim * self.hidden + shared

    def metrics(self) -> dict[str, torch.Tensor]:
        return self.stats


class MoEBlock(ResidualBlock):
    """Dense attention (any sequence mixer given by ``mixer``) followed by an MoE.

    ``mixer`` is a config node with a ``_target_`` (attention by default, see
    conf/block/moe.yaml), so MoE combines with any sequence mixer without this file
    importing another plugin.
    """

    def __init__(self, dim: int, mixer: dict, n_experts: int = 8, top_k: int = 2, hidden: int | None = None,
                 n_shared: int = 0, gating: str = "softmax_norm", capacity_factor: float | None = None,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 1e-3, backend: str = "auto",
                 norm_eps: float = 1e-5, layer_idx: int = 0):
        from hydra.utils import instantiate

        mixer_module = instantiate(mixer, layer_idx=layer_idx) if isinstance(mixer, (dict, DictConfig)) else mixer
        moe = MoE(dim, n_experts, top_k, hidden, n_shared, gating, capacity_factor, balance_loss_weight,
                  z_loss_weight, backend)
        super().__init__(mixer_module, moe, dim, norm_eps)

    check = staticmethod(moe_problems)

    # The experts have no tensor-parallel plan (expert parallelism is not built yet), so
    # an MoE block is not tensor-parallel whatever its mixer is.
    @property
    def capabilities(self) -> frozenset[str]:
        return capabilities_of(self.mixer) - {TENSOR_PARALLEL}

    @staticmethod
    def part_capabilities(node: DictConfig) -> dict[str, frozenset[str]]:
        target = node.mixer._target_
        cls = target_class(target)
        return {f"moe mixer ({target}) with experts": capabilities_of(cls)
                - {TENSOR_PARALLEL}}
