"""Tensor parallel (``parallel=tp``) and its 2-D mesh with FSDP (``parallel=fsdp_tp``),
with torch's DTensor ``parallelize_module``.

The device mesh is Lightning's ``ModelParallelStrategy`` mesh, ``(data_parallel,
tensor_parallel)``: processes in one tensor-parallel group hold slices of the same
layers and see the same batch; data-parallel groups see different batches and, when
``data_parallel > 1``, shard the rest with FSDP2 (``llmzoo.shared.sharding``).

Each block says how its linears split (``tensor_parallel_plan``, capability
``tensor_parallel``): column-wise layers (attention's q, k, v, SwiGLU's gate and up)
produce whole heads / hidden units per process, row-wise layers (attention's out,
SwiGLU's down) sum their partial outputs (one all-reduce after attention and one
after the MLP per block). The embedding is split by vocabulary rows and the head by
vocabulary columns (gathered into full logits for the loss). With
``sequence_parallel`` the norms and the residual stream are split along the sequence
instead of replicated (all-gather before the column-wise layers, reduce-scatter after
the row-wise ones): the same math with less activation memory.

MoE experts and Mamba mixers have no plan: they are refused at compose time.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn

from llmzoo.config import class_attr
from llmzoo.interfaces import TENSOR_PARALLEL, capabilities_of
from llmzoo.layers import swiglu_hidden
from llmzoo.shared.sharding import PRECISIONS, shard_stack


def styles(sequence_parallel: bool) -> dict[str, Any]:
    """The torch ParallelStyle for each kind a block's plan names."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    if sequence_parallel:  # activations between blocks: split along the sequence (dim 1)
        return {"colwise": ColwiseParallel(input_layouts=Shard(1)),
                "rowwise": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                "norm": SequenceParallel(),
                "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                             use_local_output=False),
                "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    return {"colwise": ColwiseParallel(), "rowwise": RowwiseParallel(), "norm": None,
            "embedding": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Replicate())}


class TensorParallel:
    """``tensor_parallel`` processes split every layer; ``data_parallel`` such groups
    train on different data (FSDP2 across them when more than one)."""

    requires: frozenset[str] = frozenset({TENSOR_PARALLEL})
    uses_device_mesh = True  # parallelize() runs in LightningModule.configure_model with Lightning's mesh

    def __init__(self, tensor_parallel: int = 2, data_parallel: int = 1, sequence_parallel: bool = False,
                 shard_vocab: bool = True, backend: str = "auto", save_distributed_checkpoint: bool = True,
                 mixed_precision: str | None = None, activation_checkpointing: bool = False):
        self.tp, self.dp = int(tensor_parallel), int(data_parallel)
        self.sequence_parallel, self.shard_vocab = sequence_parallel, shard_vocab
        self.backend, self.save_distributed_checkpoint = backend, save_distributed_checkpoint
        self.mixed_precision, self.activation_checkpointing = mixed_precision, activation_checkpointing

    def lightning_strategy(self) -> Any:
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=self.dp, tensor_parallel_size=self.tp,
                                     save_distributed_checkpoint=self.save_distributed_checkpoint,
                                     process_group_backend=None if self.backend == "auto" else self.backend)

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor.parallel import parallelize_module

        missing = [i for i, b in enumerate(model.blocks) if TENSOR_PARALLEL not in capabilities_of(b)]
        if missing:
            raise ValueError(f"parallel=tp: blocks {missing} have no tensor-parallel plan "
                             f"({type(model.blocks[missing[0]]).__name__}); use parallel=fsdp or ddp")
        tp_mesh = device_mesh["tensor_parallel"]
        style = styles(self.sequence_parallel)
        outer = self._outer_plan(model, style)
        if outer:
            parallelize_module(model, tp_mesh, outer)
        for block in model.blocks:
            plan = {name: style[kind] for name, kind in block.tensor_parallel_plan.items() if style[kind] is not None}
            parallelize_module(block, tp_mesh, plan)
        if self.dp > 1:  # 2-D: FSDP over the data-parallel dimension of the same mesh
            shard_stack(model, model.blocks, device_mesh, mixed_precision=self.mixed_precision,
                        activation_checkpointing=self.activation_checkpointing)
        return model

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        problems = []
        tp, dp = node.get("tensor_parallel"), node.get("data_parallel")
        devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
        if not (isinstance(tp, int) and tp >= 1 and isinstance(dp, int) and dp >= 1):
            return [f"parallel.tensor_parallel={tp!r} and parallel.data_parallel={dp!r} must be positive integers"]
        if not isinstance(devices, int) or tp * dp != devices * nodes:
            problems.append(f"the mesh parallel.data_parallel={dp} x parallel.tensor_parallel={tp} = {dp * tp} "
                            f"processes must equal the world trainer.devices={devices} x trainer.num_nodes={nodes}")
        block = cfg.get("block") or {}
        heads, kv = block.get("n_heads"), block.get("n_kv_heads") or block.get("n_heads")
        if isinstance(kv, int) and kv % tp:
            problems.append(f"parallel.tensor_parallel={tp} must divide the key/value heads (model.n_kv_heads="
                            f"{kv}, model.n_heads={heads}): each process holds whole head groups")
        dim, hidden = block.get("dim"), block.get("ffn_hidden")
        hidden = hidden or (swiglu_hidden(dim) if isinstance(dim, int) else None)
        if isinstance(hidden, int) and hidden % tp:
            problems.append(f"parallel.tensor_parallel={tp} must divide model.ffn_hidden={hidden}")
        seq = cfg.get("data", {}).get("seq_len")
        if node.get("sequence_parallel") and isinstance(seq, int) and seq % tp:
            problems.append(f"parallel.sequence_parallel=true splits data.seq_len={seq} into "
                            f"parallel.tensor_parallel={tp} equal parts: it must divide it")
        if node.get("mixed_precision") not in PRECISIONS:
            problems.append(f"parallel.mixed_precision={node.get('mixed_precision')!r} is not one of {list(PRECISIONS)}")
        if cfg.trainer.get("compile"):
            problems.append("trainer.compile=true is not supported with parallel=tp yet")
        if "logits" not in (class_attr(cfg.objective, "reads") or {"logits"}):
            problems.append(f"objective._target_={cfg.objective._target_!r} computes the logits itself from the head's "
                            "weight (a fused cross-entropy), but parallel=tp splits the head by vocabulary: turn the "
                            "fusion off (objective.fused_ce=false) or use parallel=fsdp or ddp")
        return problems

    def _outer_plan(self, model: nn.Module, style: dict[str, Any]) -> dict[str, Any]:
        """Embedding, final norm and head: split by vocabulary (unless tied or
        ``shard_vocab=false``); with sequence parallel they also move the activations
        between the full sequence and its shards."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput

        if self.shard_vocab and model.head.weight is not model.embedding.weight:
            plan = {"embedding": style["embedding"], "head": style["head"]}
        elif self.sequence_parallel:  # replicated vocabulary, sequence-split stream
            plan = {"embedding": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                     use_local_output=False),
                    "head": PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                               use_local_output=True)}
        else:
            plan = {}
        if self.sequence_parallel:
            plan["norm"] = style["norm"]
        return plan
