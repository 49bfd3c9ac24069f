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

from .errors import UserError

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

    def every_batch(self) -> Iterable[Batch]:
        """Optional: every training and validation row once, in a fixed order, in batches
        of ``batch_size`` -- for objectives that precompute per-row values before training
        (DPO's reference log-probs with ``precompute_reference``). Called after ``setup``."""


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

    # Optional members: see BlockExtras; the decode state's contract: DecodeState.


# Capability names blocks declare and decoders / strategies check.
KV_CACHE = "kv_cache"  # state is a key/value cache; it has rewind(n): forget the last n tokens
RECURRENT = "recurrent"  # state is fixed-size (conv + SSM state)
STATEFUL = "stateful"  # any decode-time state: KV_CACHE or RECURRENT imply it
# init_state(..., static=True) gives a state whose tensors keep their shapes and
# addresses and are updated in place (positions as tensors), with a reset() method:
# a decode step over it compiles once (torch.compile, CUDA graphs). A static state
# that has ``rewind(n)`` rewinds in place (compiled speculative decoding).
STATIC_STATE = "static_state"
# the state takes a candidate tree: set ``state.tree`` to a (T, T) bool ancestor mask
# before a forward of T candidates, then ``state.keep(start, index)`` keeps the
# accepted ones (Medusa's one-forward verification). With STATIC_STATE too, a static
# state takes them as well, keeping its shapes (compiled Medusa, ``decoder.compile``).
TREE_MASK = "tree_mask"
# init_state(..., rows=True) gives a state whose rows are independent sequences, each at
# its own position (a server's continuous batching): ``state.put(row, other, other_row=0)``
# makes row ``row`` a copy of ``other``'s row (a state of the same block, e.g. a batch-1
# prefill), and ``state.head(b)`` is the first b rows as a state sharing storage (a forward
# of b rows through it advances them in place). Checked by llmzoo.testing.check_row_state.
ROW_STATE = "row_state"
# the block has a ``tensor_parallel_plan``: {submodule name: "colwise" | "rowwise" | "norm"}
# whose column-/row-wise split keeps the math unchanged (parallel=tp; a mixer or ffn
# declares its own plan, ResidualBlock joins them).
TENSOR_PARALLEL = "tensor_parallel"

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

    Optional members, used when present:
      uses_device_mesh = True      parallelize() runs in LightningModule.configure_model
                                   with Lightning's device mesh (FSDP, TP, pipeline)
      train_step(module, batch)    the whole optimizer step of one batch, under manual
      eval_step(module, batch)     optimization (a pipeline schedule); return ``Loss``.
                                   The objective's ``loss`` computes the loss either way.
      full_state_dict(model)       the complete weights on global rank 0 (a collective),
                                   when the model is split in a way DTensor does not describe
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


class ObjectiveExtras(Protocol):
    """Optional members of an Objective; core uses each one when present."""

    #: ModelOutput fields ``loss`` reads; default {"logits", "aux_loss"}. Without "logits",
    #: core runs ``model(ids, logits=False)`` and the loss gets "hidden" and "head_weight"
    #: instead (fused linear cross-entropy); a static ``reads_for(node)`` answers at compose
    #: time when it depends on the config. A strategy that computes only logits on its last
    #: stage (pipeline) or splits the head (tensor parallel) refuses objectives that read
    #: "hidden" or not "logits".
    reads: frozenset[str]
    #: multiplier of the blocks' auxiliary loss (MoE balance); a pipeline applies it per stage.
    aux_loss_weight: float
    #: True when ``train_step`` owns the optimizer step (PPO's epochs over a rollout). At most
    #: one of the objective and the parallel strategy may own the step (compose-time check).
    manual_optimization: bool

    def setup(self, model: nn.Module, tokenizer: Tokenizer) -> None:
        """Called once with the built model (before sharding) and the tokenizer, before
        training or loading: size heads, copy a frozen reference model."""

    def inputs(self, batch: Batch) -> torch.Tensor:
        """(k * B, T) token ids the model runs on, the k rows of each batch row consecutive
        (DPO: chosen, rejected, chosen, ...), so that splitting both along dim 0 into
        micro-batches keeps them aligned. Default: ``batch["input_ids"]``."""

    def weight(self, batch: Batch) -> torch.Tensor:
        """Scalar count that ``loss`` averages over (labelled tokens for cross-entropy);
        default: the number of rows. A micro-batched step weights each part by it, so
        its loss and gradients equal one step on the whole batch."""

    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """Runs the whole model before ``inputs``/``loss`` (no gradients): RL objectives
        sample and score responses here and return the batch the loss reads. Strategies
        that split the model across processes refuse objectives with ``prepare``."""

    def on_fit_start(self, module: Any) -> None:
        """When training starts, with the LightningModule (e.g. precompute reference log-probs)."""

    def train_step(self, module: Any, batch: Batch) -> Loss:
        """The whole optimizer step of one batch under manual optimization:
        ``module.optimizers()``, ``module.manual_backward(loss)``, ``module.clip_and_step()``."""


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


class DecoderExtras(Protocol):
    """Optional members of a Decoder."""

    #: figures of the last ``generate`` (``accepted_per_step`` for speculative and Medusa
    #: decoding, ``compile_s``); benchmarks record every numeric entry.
    stats: dict[str, float]
    #: the token sampler (``llmzoo.shared.decoding.Sampler``); RL rollouts reseed it per rollout.
    sampler: Any

    def setup(self, run: Any) -> None:
        """Called with the loaded run (``llmzoo.api.Run``: model, tokenizer, cfg, objective)
        before ``generate``, by decoders that need more than the model (Medusa heads from
        the run's objective, a draft model)."""


class DecodeState(Protocol):
    """What ``Block.init_state`` returns (one per block; ``LanguageModel.init_states``
    gives the list). All rows share one position ``pos``."""

    def reset(self) -> None:
        """Forget every token (static states reuse their buffers)."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (B',) long, in that order -- rows may repeat (beam
        search duplicates a beam) or drop; the batch size becomes B'."""

    # Where the block can: ``rewind(n)`` forgets the last n tokens (KV caches), with
    # TREE_MASK ``tree`` / ``keep(start, index)`` verify a candidate tree, and with
    # ROW_STATE ``put(row, other, other_row)`` / ``head(b)`` (see the capability names above).
    # A rows=True state that has ``rewind`` also takes one count per row: ``rewind([n_0,
    # ..., n_{B-1}])`` (batched speculative decoding, ``llmzoo.shared.decoding.RowStreams``).
    # With TREE_MASK too, a rows=True state takes one ``tree`` for every row (candidates
    # stored after each row's own tokens) and ``keep(starts, indexes)`` with one start and
    # one index tensor per row (batched Medusa).


class TokenizerExtras(Protocol):
    """Optional members of a Tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, faster (the data pipeline uses it when present)."""

    def render_chat(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False
                    ) -> list[tuple[str, bool]]:
        """Messages ({"role": system|user|assistant, "content": str}) as (text, trained)
        pieces in this tokenizer's chat format -- inherit ``llmzoo.ChatTemplate`` for the
        default one; with ``generation_prompt`` they end where the assistant's answer starts."""

    add_bos: bool
    """Whether a prompt starts with ``bos_id`` (as Llama's tokenizers say in
    ``add_bos_token``); absent means no."""

    def hf_tokenizer(self) -> Any:
        """This tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (what ``llmzoo
        export-hf`` writes as tokenizer.json); tokenizers without one cannot be exported."""

    def chat_template_jinja(self) -> str:
        """Its chat format as a Jinja template (tokenizer_config.json's ``chat_template``)."""


class BlockExtras(Protocol):
    """Optional members of a Block (and of the mixers and FFNs inside ``ResidualBlock``)."""

    #: with TENSOR_PARALLEL: {submodule name: "colwise" | "rowwise" | "norm"}
    tensor_parallel_plan: dict[str, str]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul/conv FLOPs per token (2 per multiply-add; elementwise work not counted)."""

    def metrics(self) -> dict[str, "torch.Tensor | Metric"]:
        """Figures of the last forward, logged every training step and averaged over
        layers unless they are ``summed`` (e.g. MoE expert load, dropped tokens)."""

    def reset_extra_parameters(self) -> None:
        """Initialise parameters that are not Linear/Embedding weights (SSM ``A_log``,
        router biases); called by ``LanguageModel.reset_parameters``. A Linear whose
        output joins the residual stream sets ``linear.residual_out = True`` to be
        initialised with std / sqrt(2 * n_layers)."""

    @staticmethod
    def part_capabilities(node: Any) -> dict[str, frozenset[str]]:
        """Capabilities per part, from the config node alone (hybrid stacks, configurable mixers)."""




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
