"""The five interfaces every llmzoo plugin implements, and the small records they exchange.

Shapes use B = batch, T = time (tokens), D = model width, V = vocabulary size.
These are structural ``Protocol``s: a plugin implements one by having the named
members, it never needs to inherit from anything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

# A batch is a plain dict of tensors: ``input_ids`` (B, T) long, ``labels`` (B, T) long
# with -100 where no loss is taken, and whatever else an objective declares it needs
# (``chosen_input_ids``, ``rejected_input_ids``, ...).
Batch = dict[str, torch.Tensor]

IGNORE_INDEX = -100

E = TypeVar("E", bound="Extras")


class Extras:
    """An interface's optional members with their defaults. ``XExtras.of(thing)``, the one place
    core reads them, gives ``thing``'s member where it has one, else the default (None for an
    absent method). A plugin never inherits these records: it just has the members."""

    @classmethod
    def of(cls: type[E], thing: Any) -> E:
        return cls(**{f.name: getattr(thing, f.name) for f in fields(cls)  # type: ignore[arg-type]
                      if hasattr(thing, f.name)})


class ConfigChecked(Protocol):
    """Optional on any class a config node names with ``_target_`` (blocks, mixers,
    decoders, objectives, data modules, strategies), nested nodes included.

    ``check(node, cfg) -> list[str]`` (a staticmethod) returns the problems of its own node
    (``"n_heads=5 does not divide dim=64"``), prefixed by core with the node's key, all reported
    before anything is built -- after core refused keys ``__init__`` does not take and values
    off a simple annotation (``int``, ``float | None``). It may read plain values of other
    groups, never another group's class: such rules are the ``llmzoo_validate`` hook's.
    """

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]: ...


class DataModule(Protocol):
    """A LightningDataModule named by ``data._target_``, built with ``tokenizer``,
    ``seed`` and ``work_dir`` beside its config keys.

    ``provides: frozenset[str]`` names the batch fields it yields (or ``provides_for``, see
    ``DataModuleExtras``); at compose time ``objective.needs`` must be a subset, or the run is
    refused naming the data options that fit (``objective=dpo`` -> ``use data=preferences``).
    """

    provides: frozenset[str]


@runtime_checkable
class TrainSampler(Protocol):
    """A sampler that resumes mid-epoch (``llmzoo.data.ResumableSampler``): a resume sets
    ``start_batch`` (batches of the epoch trained) and ``epoch_offset`` (epochs Lightning missed)."""

    batch_size: int
    start_batch: int
    epoch_offset: int

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class DataModuleExtras(Extras):
    """Optional members of a DataModule."""

    #: the training sampler, set by ``setup``: resumed runs continue mid-epoch with it.
    train_sampler: TrainSampler | None = None
    #: ``every_batch()``: every training and validation row once, in a fixed order, in batches
    #: (after ``setup``): objectives precompute per-row values with it (DPO's reference log-probs).
    every_batch: Callable[[], Iterable[Batch]] | None = None
    #: a static ``provides_for(node)``: the batch fields when they depend on the config.
    provides_for: Callable[[Any], frozenset[str]] | None = None


@dataclass
class ModelOutput:
    """What ``LanguageModel.forward`` returns.

    logits: (B, T, V) next-token logits; None when the model ran with ``logits=False``
        (for an objective whose ``reads`` leaves them out).
    aux_loss: scalar sum of the blocks' auxiliary losses (MoE balance, ...) or None.
    hidden: (B, T, D) final hidden states after the last norm (heads such as Medusa use them).
    head_weight: (V, D) the vocabulary head's weight, set with ``logits=False``: logits =
        hidden @ head_weight.T, which a fused loss forms a chunk at a time
        (``llmzoo.shared.losses.linear_cross_entropy``) instead of holding (B, T, V).
    """

    logits: torch.Tensor | None
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None


@dataclass
class Segments:
    """Documents packed into the rows of a batch (``data.packing=document``), handed by
    ``LanguageModel.forward(..., segments=)`` to every block (and ffn) with the PACKED capability.

    doc_ids: (B, T) long, the document of each token: one contiguous run per document, -1 on padding.
    positions: (B, T) long, each token's position inside its document (0 at its first token).
    A PACKED block gives each document what it gives alone: attention within a document with
    rotary positions at ``positions``, recurrent states reset where ``positions == 0``. Masks
    derived from them are kept in ``cache`` (built once per batch, shared by the layers).
    """

    doc_ids: torch.Tensor
    positions: torch.Tensor
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, doc_ids: torch.Tensor) -> "Segments":
        """Segments of the (B, T) document ids, positions counted from each document's start."""
        index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
        starts = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True)
        return cls(doc_ids, index - torch.where(starts, index, 0).cummax(1).values)

    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query t may see key s: same document and s <= t."""
        if "mask" not in self.cache:
            T = self.doc_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
            self.cache["mask"] = ((self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) & causal)[:, None]
        return self.cache["mask"]


@dataclass
class Metric:
    """A logged figure that says how it combines over processes and micro-batches:
    ``"mean"`` (weighted by each part's ``Objective.weight`` where a strategy splits a
    batch) or ``"sum"`` (counts such as tokens). A bare tensor or float means ``"mean"``."""

    value: torch.Tensor | float
    reduce: str = "mean"  # "mean" | "sum"


def summed(value: torch.Tensor | float) -> Metric:
    """A metric that adds up over processes and micro-batches (token counts, dropped tokens)."""
    return Metric(value, "sum")


def as_metric(value: "torch.Tensor | float | Metric") -> Metric:
    return value if isinstance(value, Metric) else Metric(value)


@dataclass
class Loss:
    """What an objective returns.

    value: the scalar to minimise, a mean over ``Objective.weight(batch)`` units.
    metrics: detached figures to log, {name: tensor | float | Metric}.
    measure: what ``val_loss`` reports -- the objective's own measure without auxiliary
        terms (cross-entropy for language modelling, minus the mean reward for RL), so that
        runs with different blocks compare on equal terms; ``value`` when None.
    """

    value: torch.Tensor
    metrics: dict[str, "torch.Tensor | float | Metric"] = field(default_factory=dict)
    measure: torch.Tensor | None = None


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
    False until ``fit`` ran or a trained vocabulary was loaded. ``fit(texts)`` gets the
    text the model will see, in the units it will be encoded in: pretraining documents as
    they are; for chat data (``data=instructions``, ``preferences``, ``prompts``) each piece
    of the rendered chat, its markers included (``render_chat``), never the raw records."""

    is_trained: bool

    def fit(self, texts: Iterable[str]) -> None: ...


@runtime_checkable
class Block(Protocol):
    """One layer of the stack; ``LanguageModel`` stacks ``n_layers`` of them.

    ``forward(x, state=None)``: x is (B, T, D) and the result is (B, T, D).
    When ``state`` (from ``init_state``) is given, the block reads and advances it so
    that feeding a sequence in pieces (e.g. one token at a time) gives the same
    outputs as one forward over the whole sequence. All rows of a batch share one
    position: the state holds ``pos`` tokens for every row. A block with the PACKED
    capability is also called as ``forward(x, segments=Segments)`` (packed training rows,
    no state); other blocks never get ``segments``.
    """

    capabilities: frozenset[str]

    def forward(self, x: torch.Tensor, *, state: Any = None) -> torch.Tensor: ...

    def init_state(
        self, batch_size: int, max_len: int, *, device: torch.device | None, dtype: torch.dtype | None
    ) -> Any:
        """Decode-time state for ``batch_size`` rows and up to ``max_len`` tokens, or None."""

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last forward (e.g. MoE load balance), or None."""

    # Optional members: see BlockExtras; the decode state's contract: DecodeState.


# Capability names blocks declare and decoders / strategies check.
KV_CACHE = "kv_cache"  # state is a key/value cache, a ``RewindableState``
RECURRENT = "recurrent"  # state is fixed-size (conv + SSM state)
STATEFUL = "stateful"  # any decode-time state: KV_CACHE or RECURRENT imply it
# init_state(..., static=True) gives a state whose tensors keep their shapes and
# addresses and are updated in place (positions as tensors), with a reset() method:
# a decode step over it compiles once (torch.compile, CUDA graphs). A static state
# that has ``rewind(n)`` rewinds in place (compiled speculative decoding).
STATIC_STATE = "static_state"
# the state takes a candidate tree (``TreeState``: Medusa's one-forward verification);
# with STATIC_STATE too, a static state keeps its shapes doing so (compiled Medusa).
TREE_MASK = "tree_mask"
# init_state(..., rows=True) gives a state whose rows are independent sequences, each at
# its own position (``RowsState``: a server's continuous batching); llmzoo.testing.check_row_state.
ROW_STATE = "row_state"
# the block has a ``tensor_parallel_plan``: {submodule name: "colwise" | "rowwise" | "norm"}
# whose column-/row-wise split keeps the math unchanged (parallel=tp; a mixer or ffn
# declares its own plan, ResidualBlock joins them).
TENSOR_PARALLEL = "tensor_parallel"
# forward(x, segments=Segments) keeps the documents packed into a row apart: each gives what
# it gives alone (data.packing=document; llmzoo.testing.check_block tests it).
PACKED = "packed"

#: What a capability implies: every kind of decode state is a decode state. Applied by
#: ``capabilities_of`` -- at compose time and at run time alike -- so a block that declares
#: only ``{"recurrent"}`` (as the first release's contract allowed) is stateful.
IMPLIES: dict[str, frozenset[str]] = {
    KV_CACHE: frozenset({STATEFUL}), RECURRENT: frozenset({STATEFUL}), STATIC_STATE: frozenset({STATEFUL}),
    TREE_MASK: frozenset({STATEFUL}), ROW_STATE: frozenset({STATEFUL}),
}


def implied(caps: Iterable[str]) -> frozenset[str]:
    """``caps`` with everything they imply (``IMPLIES``), to a fixed point."""
    out = frozenset(caps)
    while True:
        more = out.union(*(IMPLIES.get(c, frozenset()) for c in out))
        if more == out:
            return out
        out = more


def capabilities_of(thing: Any) -> frozenset[str]:
    """The capabilities a block, mixer or model (instance or class) has: what its
    ``capabilities`` declares (nothing when absent) with their implications. The one
    function decoders, strategies and core read capabilities through."""
    return implied(getattr(thing, "capabilities", None) or ())


@runtime_checkable
class ParallelStrategy(Protocol):
    """How the model is spread over processes and devices.

    ``lightning_strategy()`` is what ``lightning.Trainer(strategy=...)`` receives.
    ``parallelize(model, device_mesh)`` returns the distributed model (it may modify
    ``model`` in place); strategies that leave the model alone return it unchanged.
    ``requires`` lists the block capabilities the strategy needs (checked at config time).

    Optional members: ``StrategyExtras``.
    """

    requires: frozenset[str]

    def lightning_strategy(self) -> Any: ...

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module: ...


@runtime_checkable
class Objective(Protocol):
    """A training loss. Core runs the model, the objective turns its output into a loss:

        batch = objective.prepare(model, batch)          # optional (RL: sample responses)
        out = model(objective.inputs(batch))             # optional inputs(); default input_ids
        loss = objective.loss(out, batch)

    so every strategy -- a pipeline schedule included, which calls ``loss`` on the last
    stage per micro-batch -- computes the same loss. ``needs`` names the batch fields the
    objective reads; it is checked at compose time against the data module's ``provides``.
    An objective that is an ``nn.Module`` trains its own parameters (value head, Medusa
    heads) with the model's. See ``ObjectiveExtras`` for the optional members.
    """

    needs: frozenset[str]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        """``out`` is the model's output on ``inputs(batch)``; ``loss.value`` is a mean over
        ``weight(batch)`` units (so a strategy can split the batch and weight the parts)."""


@dataclass(frozen=True)
class ObjectiveExtras(Extras):
    """Optional members of an Objective, with the defaults core uses when one is absent."""

    #: ModelOutput fields ``loss`` reads. Without "logits", core runs ``model(ids, logits=False)``
    #: and the loss gets "hidden" and "head_weight" (fused linear cross-entropy). Pipeline and
    #: tensor parallel refuse objectives that read "hidden" or not "logits".
    reads: frozenset[str] = frozenset({"logits", "aux_loss"})
    #: multiplier of the blocks' auxiliary loss (MoE balance); a pipeline applies it per stage.
    aux_loss_weight: float = 1.0
    #: True when ``train_step`` owns the optimizer step (PPO's epochs over a rollout). At most
    #: one of the objective and the parallel strategy may own the step (compose-time check).
    manual_optimization: bool = False
    #: ``setup(model, tokenizer)``: once, before sharding, training or loading (size heads, copy a reference).
    setup: Callable[[nn.Module, Tokenizer | None], None] | None = None
    #: ``inputs(batch) -> (k * B, T)`` ids the model runs on, each row's k consecutive (DPO: chosen,
    #: rejected, ...) so micro-batches split along dim 0 stay aligned. Default ``batch["input_ids"]``.
    inputs: Callable[[Batch], torch.Tensor] | None = None
    #: ``weight(batch)``: the count ``loss`` averages over (labelled tokens; default: rows), so a
    #: micro-batched step weighting its parts by it equals one step on the whole batch.
    weight: Callable[[Batch], torch.Tensor] | None = None
    #: ``prepare(model, batch) -> batch``: the whole model, no gradients, before ``loss`` (RL samples
    #: and scores here); strategies that split the model refuse it.
    prepare: Callable[[nn.Module, Batch], Batch] | None = None
    #: ``on_fit_start(module)``: when training starts, with the LightningModule (precomputations).
    on_fit_start: Callable[[Any], None] | None = None
    #: ``train_step(module, batch) -> Loss``: a whole manual optimizer step (``module.optimizers()``,
    #: ``module.manual_backward(loss)``, ``module.clip_and_step()``).
    train_step: Callable[[Any, Batch], Loss] | None = None
    #: static ``needs_for(node)`` / ``reads_for(node)``: ``needs`` / ``reads`` when they depend on the config.
    needs_for: Callable[[Any], frozenset[str]] | None = None
    reads_for: Callable[[Any], frozenset[str]] | None = None


@runtime_checkable
class Decoder(Protocol):
    """Text generation strategy.

    ``generate(model, prompts, max_new_tokens=..., eos_id=...)`` takes a list of B
    prompts (lists of ids, lengths may differ) and returns B lists of new ids, each
    ending at (and including) ``eos_id`` if it was produced. ``requires`` names the
    block capabilities it needs (checked at config time). See ``DecoderExtras``.
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


@dataclass(frozen=True)
class DecoderExtras(Extras):
    """Optional members of a Decoder."""

    #: figures of the last ``generate`` (``accepted_per_step`` for speculative and Medusa
    #: decoding, ``compile_s``); benchmarks record every numeric entry.
    stats: dict[str, float] = field(default_factory=dict)
    #: the token sampler (``llmzoo.shared.decoding.Sampler``); RL rollouts reseed it per rollout.
    sampler: Any = None
    #: ``setup(run)``: called with the loaded run (``llmzoo.api.Run``: model, tokenizer, cfg,
    #: objective) before ``generate``, by decoders that need more than the model (Medusa
    #: heads from the run's objective, a draft model).
    setup: Callable[[Any], None] | None = None
    #: a static ``requires_for(node)``: the capabilities it needs when they depend on the config.
    requires_for: Callable[[Any], frozenset[str]] | None = None


class DecodeState(Protocol):
    """What ``Block.init_state`` returns (one per block; ``LanguageModel.init_states``
    gives the list). All rows share one position ``pos``."""

    def reset(self) -> None:
        """Forget every token (static states reuse their buffers)."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (B',) long, in that order -- rows may repeat (beam
        search duplicates a beam) or drop; the batch size becomes B'."""

    # Where the block can: ``RewindableState`` (KV_CACHE), ``TreeState`` (TREE_MASK),
    # ``RowsState`` (ROW_STATE).


@dataclass(frozen=True)
class TokenizerExtras(Extras):
    """Optional members of a Tokenizer."""

    #: ``encode_batch(texts) -> [encode(t) for t in texts]``, faster (data modules use it).
    encode_batch: Callable[[Sequence[str]], list[list[int]]] | None = None
    #: ``render_chat(messages, generation_prompt=False) -> [(text, trained), ...]``: messages
    #: ({"role": system|user|assistant, "content": str}) as pieces in this tokenizer's chat
    #: format -- inherit ``llmzoo.ChatTemplate`` for the default one; with
    #: ``generation_prompt`` they end where the assistant's answer starts.
    render_chat: Callable[..., list[tuple[str, bool]]] | None = None
    #: whether a prompt starts with ``bos_id`` (as Llama's tokenizers say in ``add_bos_token``).
    add_bos: bool = False
    #: False until ``fit`` ran or a trained vocabulary was loaded (``TrainableTokenizer``).
    is_trained: bool = True
    #: ``hf_tokenizer()``: this tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (what
    #: ``llmzoo export-hf`` writes as tokenizer.json); without it a run cannot be exported.
    hf_tokenizer: Callable[[], Any] | None = None
    #: ``chat_template_jinja()``: its chat format as a Jinja template (``chat_template``).
    chat_template_jinja: Callable[[], str] | None = None


@dataclass(frozen=True)
class BlockExtras(Extras):
    """Optional members of a Block, and of the mixers and FFNs inside ``ResidualBlock``
    (where ``init_state`` and ``aux_loss`` are optional too)."""

    #: with TENSOR_PARALLEL: {submodule name: "colwise" | "rowwise" | "norm"}
    tensor_parallel_plan: dict[str, str] | None = None
    #: ``flops_per_token(seq_len)``: forward matmul/conv FLOPs per token (2 per multiply-add).
    flops_per_token: Callable[[int], float | None] | None = None
    #: ``metrics()``: figures of the last forward, logged each step, averaged over layers unless ``summed``.
    metrics: Callable[[], dict[str, Any]] | None = None
    #: ``reset_extra_parameters()``: init what is not a Linear/Embedding weight (SSM ``A_log``);
    #: a Linear into the residual stream sets ``linear.residual_out = True`` (std / sqrt(2 L)).
    reset_extra_parameters: Callable[[], None] | None = None
    #: a static ``part_capabilities(node) -> {part: capabilities}`` (hybrid stacks, configurable mixers).
    part_capabilities: Callable[[Any], dict[str, frozenset[str]]] | None = None
    #: a mixer's ``init_state(batch_size, max_len, *, device, dtype, **kw)`` (Block's).
    init_state: Callable[..., Any] | None = None
    #: a part's ``aux_loss()`` (Block's).
    aux_loss: Callable[[], torch.Tensor | None] | None = None


@dataclass(frozen=True)
class StrategyExtras(Extras):
    """Optional members of a ParallelStrategy."""

    #: parallelize() gets Lightning's device mesh in configure_model (FSDP, TP, pipeline); else None.
    uses_device_mesh: bool = False
    #: ``train_step(module, batch) -> Loss``: a whole manual optimizer step (a pipeline schedule).
    train_step: Callable[[Any, Batch], Loss] | None = None
    #: ``eval_step(module, batch) -> Loss``: one validation batch, likewise.
    eval_step: Callable[[Any, Batch], Loss] | None = None
    #: ``full_state_dict(model)``: all weights on rank 0 (a collective) where DTensor cannot say.
    full_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    #: a static ``requires_for(node) -> frozenset[str]``, as a decoder's.
    requires_for: Callable[[Any], frozenset[str]] | None = None


class RewindableState(Protocol):
    """A KV_CACHE state: ``rewind(n)`` forgets the last n tokens; a rows=True state takes
    one count per row (batched speculative decoding, ``llmzoo.shared.decoding.RowStreams``)."""

    def rewind(self, n: int | Sequence[int]) -> None: ...


class TreeState(Protocol):
    """A TREE_MASK state: ``tree`` = a (T, T) bool ancestor mask before a forward of T candidates,
    then ``keep(start, index)`` keeps the accepted ones (rows=True: one of each per row)."""

    tree: torch.Tensor | None

    def keep(self, start: Any, index: Any) -> None: ...


class RowsState(Protocol):
    """A ROW_STATE state (``init_state(..., rows=True)``): rows at their own positions. ``put``
    copies ``other``'s row into ``row``; ``head(b)``: the first b rows, sharing storage."""

    def put(self, row: int, other: Any, other_row: int = 0) -> None: ...

    def head(self, b: int) -> Any: ...


class Quantizer(Protocol):
    """A ``quantize=`` option of ``llmzoo-generate``: ``quantizer(model)`` quantizes; ``save`` and
    ``load`` keep the weights (``<run>/model-<name>.safetensors``) so a run is quantized once."""

    name: str

    def __call__(self, model: nn.Module) -> nn.Module: ...

    def save(self, model: nn.Module, path: Path) -> None: ...

    def load(self, model: nn.Module, path: Path) -> nn.Module: ...


class HFUnsupported(UserError, ValueError):
    """A Hugging Face checkpoint (or an llmzoo run, on export) that a converter cannot
    represent; the message names the config field or the part, and why."""


class HFArchitecture(Protocol):
    """How one family of Hugging Face ``transformers`` checkpoints maps onto llmzoo
    blocks, in both directions (returned by the ``llmzoo_hf_architectures`` hook;
    ``llmzoo_plugins.hf_io`` reads and writes the folders). Tensor names are the full state-dict
    names on each side (``model.layers.0.self_attn.q_proj.weight`` ↔
    ``blocks.0.mixer.q.weight``); every method raises ``HFUnsupported`` for what it
    cannot represent rather than guessing."""

    model_types: tuple[str, ...]  # config.json "model_type" values it imports

    def import_config(self, hf: dict, max_seq_len: int | None = None) -> dict:
        """config.json -> ``{"model": {...}, "block": {...}}``: the llmzoo config nodes
        (the block node with its ``_target_``) of the same model, its context capped at
        ``max_seq_len`` (default 4096: RoPE tables are built per layer)."""

    def import_weights(self, hf: dict, read: Any, n_layers: int,
                       wanted: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, tensor) for each of our ``wanted`` state-dict names, made one at a time
        from ``read(hf_name) -> Tensor`` (``read.has(hf_name) -> bool``) so that a large
        checkpoint is never held twice in memory."""

    def exports(self, cfg: Any) -> bool:
        """Whether this converter writes runs configured by ``cfg`` (a run's config)."""

    def export_config(self, cfg: Any, model: nn.Module) -> dict:
        """The config.json of the run's ``model`` (``architectures``, ``model_type``, sizes)."""

    def export_weights(self, cfg: Any, state: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
        """``transformers``' (name, tensor) pairs from our state dict."""


class Adapter(Protocol):
    """A ``peft=`` option: parameter-efficient fine-tuning layered on a built model
    (the built-in ``llmzoo_plugins.peft_adapters.LoRA`` uses Hugging Face ``peft``).
    Training builds the model, loads the starting weights (``init_from``), then calls
    ``apply``; ``load_run`` builds with the adapters so the stored names match."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the adapters and leave only their parameters with ``requires_grad``."""

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the adapter alone (the run folder's ``adapter/``)."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapters into the base weights: a model with the plain layers back,
        giving the same outputs (``llmzoo merge-adapter``, ``llmzoo export-hf``)."""


class Kernels(Protocol):
    """A ``kernels=`` option: faster implementations of layers' forward (fused Triton
    kernels, ...) swapped into a built model; the built-in one is
    ``llmzoo_plugins.kernels.Liger``. ``build_model`` calls ``apply`` on every model it
    builds (training, ``load_run``, generation, benchmarks).

    Parameters, buffers and state-dict names must not change, so runs load with and
    without the kernels; outputs and gradients must equal the references' within the
    kernel's rounding (``llmzoo.testing.check_kernels``). Where a kernel cannot run (no
    GPU, its library missing) the reference must stay in place, unless the user asked
    for that kernel by name."""

    name: str

    def apply(self, model: nn.Module) -> nn.Module:
        """The model with the faster forwards in place (it may be the same object)."""
