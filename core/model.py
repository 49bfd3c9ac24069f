"""LanguageModel: token embedding -> blocks -> final norm -> vocabulary head."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .interfaces import PACKED, BlockExtras, ModelOutput, Segments, capabilities_of
from .layers import RMSNorm, flops_of


class LanguageModel(nn.Module):
    """A decoder-only language model over any stack of blocks.

    ``blocks`` is a sequence of modules implementing ``llmzoo.interfaces.Block``
    (build them one per layer: a shared instance would share weights).
    ``forward(input_ids (B, T), states=None) -> ModelOutput(logits (B, T, V), aux_loss)``.
    With ``states`` from ``init_states`` the call advances them (incremental decoding);
    with ``segments`` (``llmzoo.interfaces.Segments``) each row holds packed documents.
    ``logits=False`` skips the head: the output carries ``hidden`` and ``head_weight`` for a
    loss that forms the logits itself, chunk by chunk (``llmzoo.shared.losses.linear_cross_entropy``).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        blocks: Sequence[nn.Module],
        *,
        max_seq_len: int,
        tie_embeddings: bool = False,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.vocab_size, self.dim, self.max_seq_len = vocab_size, dim, max_seq_len
        self.init_std = init_std
        self.embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the head's weight the embedding's (one tensor). Moves
        that make new tensors (``to_empty`` off the meta device) undo the sharing: call again."""
        if self.tie_embeddings:
            self.head.weight = self.embedding.weight

    @property
    def capabilities(self) -> frozenset[str]:
        """What every block can do (the intersection)."""
        caps = [capabilities_of(b) for b in self.blocks]
        return frozenset.intersection(*caps) if caps else frozenset()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std); projections back into the residual
        stream (marked ``residual_out``) scaled by 1/sqrt(2 * n_layers)."""
        scaled = self.init_std / math.sqrt(2 * max(1, len(self.blocks)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, scaled if getattr(m, "residual_out", False) else self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, self.init_std)
        # Then parameters with a special init (SSM decay rates, dt biases, expert weights),
        # which may override the generic init of their own linears.
        for m in self.modules():
            reset = BlockExtras.of(m).reset_extra_parameters if m is not self else None
            if reset is not None:
                reset()

    def forward(self, input_ids: torch.Tensor, *, states: list[Any] | None = None,
                logits: bool = True, segments: Segments | None = None) -> ModelOutput:
        x = self.embedding(input_ids)
        if segments is not None:  # packed rows: every block must keep their documents apart
            if states is not None or PACKED not in self.capabilities:
                raise ValueError("packed rows (segments) need blocks with the 'packed' capability and no decode "
                                 f"states; these blocks have {sorted(self.capabilities)}")
            for block in self.blocks:
                x = block(x, segments=segments)
        for i, block in enumerate(self.blocks if segments is None else ()):
            x = block(x, state=None if states is None else states[i])
        hidden = self.norm(x)
        aux = None
        for block in self.blocks:  # a plain loop: torch.compile traces it (no walrus in comprehensions)
            a = _aux(block)
            if a is not None:
                aux = a if aux is None else aux + a
        if logits:
            return ModelOutput(self.head(hidden), aux, hidden)
        if type(self.head) is not nn.Linear or self.head.bias is not None:  # its weight must be the whole map
            raise ValueError(f"logits=False needs the head to be a plain bias-free nn.Linear, not "
                             f"{type(self.head).__name__} (an adapter or quantized head): compute the logits")
        return ModelOutput(None, aux, hidden, self.head.weight)

    def init_states(self, batch_size: int, max_len: int, *, device=None, dtype=None,
                    static: bool = False, rows: bool = False) -> list[Any]:
        """One decode-time state per block, for ``batch_size`` rows and ``max_len`` tokens.
        ``static``: fixed-shape states updated in place (blocks with ``static_state``);
        ``rows``: rows at independent positions (blocks with ``row_state``)."""
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={self.max_seq_len}")
        p = self.embedding.weight
        device = device or p.device
        dtype = dtype or p.dtype
        kw = {"static": True} if static else {}
        if rows:
            kw["rows"] = True
        blocks: Iterable[Any] = self.blocks  # modules with Block's members
        return [b.init_state(batch_size, max_len, device=device, dtype=dtype, **kw) for b in blocks]

    def flops_per_token(self, seq_len: int) -> float | None:
        """Forward FLOPs per token at context ``seq_len``: every block's own count plus the
        vocabulary head (matmuls and convolutions, 2 FLOPs per multiply-add; elementwise
        work and the embedding lookup are not counted). Training is ~3x this. None when
        a block does not implement the optional ``flops_per_token``."""
        blocks = flops_of(self.blocks, seq_len)
        return None if blocks is None else blocks + 2 * self.dim * self.vocab_size

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n


def _aux(block: nn.Module) -> torch.Tensor | None:
    # Block.aux_loss, read with getattr (not BlockExtras.of) so that a compiled
    # (fullgraph) decode step traces through it.
    fn: Callable[[], Any] | None = getattr(block, "aux_loss", None)
    return fn() if fn is not None else None
