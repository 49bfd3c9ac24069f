"""The five interfaces every llmzoo plugin implements, and the small records they exchange.

Shapes use B = batch, T = time (tokens), D = model width, V = vocabulary size.
These are structural ``Protocol``s: a plugin implements one by having the named
members, it never needs to inherit from anything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

# A batch is a plain dict of tensors: ``input_ids`` (B, T) long, ``labels`` (B, T) long
# with -100 where no loss is taken, and whatever else an objective declares it needs
# (``chosen_input_ids``, ``rejected_input_ids``, ...).
Batch = dict[str, torch.Tensor]

IGNORE_INDEX = -100


class ConfigChecked(Protocol):
    """Optional on any class a config node names with ``_target_`` (blocks, mixers,
    decoders, objectives, data modules, strategies), nested nodes included.

    ``check(node, cfg) -> list[str]`` (a staticmethod) returns the problems of its own
    node -- e.g. ``"n_heads=5 does not divide dim=64"`` -- as sentences; core prefixes
    each with the node's key (``block.mixers.attention: ...``) and reports them all
    before anything is built. Core also refuses keys the class's ``__init__`` does not
    take and values that do not match a simple annotation (``int``, ``float | None``).
    Rules that span groups go in the ``llmzoo_validate`` hook instead.
    """

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]: ...


class DataModule(Protocol):
    """A LightningDataModule named by ``data._target_``, built with ``tokenizer``,
    ``seed`` and ``work_dir`` beside its config keys.

    ``provides: frozenset[str]`` names the batch fields it yields; a module whose
    fields depend on its config gives a static ``provides_for(node) -> frozenset[str]``
    instead. At compose time ``objective.needs`` must be a subset, or the run is refused
    naming the data options that fit (``objective=dpo`` -> ``use data=preferences``).
    """

    provides: frozenset[str]


@dataclass
class ModelOutput:
    """What ``LanguageModel.forward`` returns.

    logits: (B, T, V) next-token logits.
    aux_loss: scalar sum of the blocks' auxiliary losses (MoE balance, ...) or None.
    hidden: (B, T, D) final hidden states after the last norm (heads such as Medusa use them).
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class Loss:
    """What an objective returns: the scalar to minimise and detached metrics to log."""

    value: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. Special ids are always inside ``range(vocab_size)``."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | Path) -> None:
        """Write everything needed to rebuild this tokenizer into ``directory``."""

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Rebuild a tokenizer that ``save`` wrote."""


class TrainableTokenizer(Tokenizer, Protocol):
    """A tokenizer that must see the training text first (BPE). ``is_trained`` is
    False until ``fit`` ran or a trained vocabulary was loaded."""

    is_trained: bool

    def fit(self, texts: Iterable[str]) -> None: ...


@runtime_checkable
class Block(Protocol):
    """One layer of the stack; ``LanguageModel`` stacks ``n_layers`` of them.

    ``forward(x, state=None)``: x is (B, T, D) and the result is (B, T, D).
    When ``state`` (from ``init_state``) is given, the block reads and advances it so
    that feeding a sequence in pieces (e.g. one token at a time) gives the same
    outputs as one forward over the whole sequence. All rows of a batch share one
    position: the state holds ``pos`` tokens for every row.
    """

    capabilities: frozenset[str]

    def forward(self, x: torch.Tensor, *, state: Any = None) -> torch.Tensor: ...

    def init_state(
        self, batch_size: int, max_len: int, *, device: torch.device | None, dtype: torch.dtype | None
    ) -> Any:
        """Decode-time state for ``batch_size`` rows and up to ``max_len`` tokens, or None."""

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last forward (e.g. MoE load balance), or None."""

    # Optional members, used when present:
    #   flops_per_token(seq_len) -> float   forward matmul/conv FLOPs per token (2 per
    #                                        multiply-add; elementwise work not counted)
    #   metrics() -> dict[str, Tensor]       logged every training step (e.g. expert load)
    #   part_capabilities(node) (static)     capabilities per part from the config alone


# Capability names blocks declare and decoders / strategies check.
KV_CACHE = "kv_cache"  # state is a key/value cache; it has rewind(n): forget the last n tokens
RECURRENT = "recurrent"  # state is fixed-size (conv + SSM state)
STATEFUL = "stateful"  # any decode-time state: KV_CACHE or RECURRENT imply it
# init_state(..., static=True) gives a state whose tensors keep their shapes and
# addresses and are updated in place (positions as tensors), with a reset() method:
# a decode step over it compiles once (torch.compile, CUDA graphs).
STATIC_STATE = "static_state"
# the state takes a candidate tree: set ``state.tree`` to a (T, T) bool ancestor mask
# before a forward of T candidates, then ``state.keep(start, index)`` keeps the
# accepted ones (Medusa's one-forward verification).
TREE_MASK = "tree_mask"
# the block has a ``tensor_parallel_plan``: {submodule name: "colwise" | "rowwise" | "norm"}
# whose column-/row-wise split keeps the math unchanged (parallel=tp; a mixer or ffn
# declares its own plan, ResidualBlock joins them).
TENSOR_PARALLEL = "tensor_parallel"


@runtime_checkable
class ParallelStrategy(Protocol):
    """How the model is spread over processes and devices.

    ``lightning_strategy()`` is what ``lightning.Trainer(strategy=...)`` receives.
    ``parallelize(model, device_mesh)`` returns the distributed model (it may modify
    ``model`` in place); strategies that leave the model alone return it unchanged.
    ``requires`` lists the block capabilities the strategy needs (checked at config time).

    Optional members, used when present:
      uses_device_mesh = True      parallelize() runs in LightningModule.configure_model
                                   with Lightning's device mesh (FSDP, TP, pipeline)
      train_step(module, batch)    the whole optimizer step of one batch, under manual
      eval_step(module, batch)     optimization (a pipeline schedule); return ``Loss``
      full_state_dict(model)       the complete weights on global rank 0 (a collective),
                                   when the model is split in a way DTensor does not describe
    """

    requires: frozenset[str]

    def lightning_strategy(self) -> Any: ...

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module: ...


@runtime_checkable
class Objective(Protocol):
    """A training loss. ``needs`` names the batch fields it reads.

    An objective may hold extra modules (a value head, Medusa heads, a frozen
    reference model); if it is an ``nn.Module`` its trainable parameters are
    optimised together with the model's. Optional ``setup(model)`` (or ``setup(model,
    tokenizer=...)``) is called once with the built model before training or loading
    (to size heads, copy a reference model); optional ``on_fit_start(module)`` runs when
    training starts (e.g. precomputing reference log-probs over the data); an objective
    with ``manual_optimization = True`` steps the optimizer itself in
    ``train_step(module, batch) -> Loss`` (PPO's epochs over a rollout).
    """

    needs: frozenset[str]

    def __call__(self, model: nn.Module, batch: Batch) -> Loss: ...


@runtime_checkable
class Decoder(Protocol):
    """Text generation strategy.

    ``generate(model, prompts, max_new_tokens=..., eos_id=...)`` takes a list of B
    prompts (lists of ids, lengths may differ) and returns B lists of new ids, each
    ending at (and including) ``eos_id`` if it was produced. ``requires`` names the
    block capabilities it needs (checked at config time).

    Optional: ``setup(run)`` is called with the loaded run (``llmzoo.api.Run``) before
    ``generate``, for decoders that need more than the model (Medusa heads from the
    run's objective, a draft model); ``stats`` (dict) reports figures of the last
    ``generate`` such as the mean accepted tokens per step.
    """

    requires: frozenset[str]

    def generate(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_id: int | None = None,
    ) -> list[list[int]]: ...
