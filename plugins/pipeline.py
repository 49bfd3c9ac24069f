"""Pipeline parallel (``parallel=pipeline``): the layers are cut into stages, one group
of consecutive blocks per process, and each batch flows through them in micro-batches
with torch's ``torch.distributed.pipelining`` schedules (GPipe, 1F1B, interleaved 1F1B).

How it fits Lightning (which has no pipeline parallelism): the strategy is Lightning's
``ModelParallelStrategy`` with a ``(data_parallel, pipeline)`` device mesh, so launching,
the data split (processes of one pipeline see the same batches), logging and
distributed checkpoints are the ones every other run uses. Only the step differs: a
pipeline step is a whole schedule (forward and backward of every micro-batch), so the
LightningModule runs it through ``Pipeline.train_step`` with manual optimization
(zero_grad, schedule, clip over all stages, optimizer and LR-scheduler step).

Each process keeps only its stage's parameters under their usual names
(``blocks.3.mixer.q.weight``); the blocks held elsewhere become ``Elsewhere``
placeholders, so checkpoints and the gathered final weights look like a single-process
model's. With ``data_parallel > 1`` each stage is sharded with FSDP2 over the data
dimension (FSDP x pipeline).

Losses: the last stage calls the objective's own ``loss`` on each micro-batch's logits
(with the batch rows of that micro-batch), so clm, sft and dpo -- any objective whose
loss reads only logits -- run here. Each micro-batch's loss is weighted by its share of
``objective.weight`` (labelled tokens, pairs), so a step equals one step on the whole
batch. Blocks' auxiliary losses (MoE balance) enter the backward of the stage that
computes them. A batch narrower than an earlier one is right-padded to a width seen
before (causal: padding changes no earlier position); each width gets its own schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.safe_load import check_dcp_metadata, safe_torch_load, weights_only_loads
from llmzoo.config import class_attr, node_class
from llmzoo.interfaces import Loss, Metric, ModelOutput, as_metric
from llmzoo.losses import batch_rows, batch_size, batch_weight, model_inputs
from llmzoo.shared.sharding import checkpointed, shard

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class Elsewhere(nn.Module):
    """Stands in for a block that another pipeline stage holds (no parameters)."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def extra_repr(self) -> str:
        return f"held by pipeline stage {self.stage}"


def balanced_split(costs: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Layers per stage, contiguous, minimising the largest stage's cost (parameters);
    the first stage also carries the embedding, the last the final norm and head."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max-cost splitting the first i layers into s stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (first_extra if s == 1 else 0) + (last_extra if s == n_stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(n_stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]


class _AuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also sends ``weight`` into ``aux``:
    a stage's auxiliary loss joins the backward without travelling to the last stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.aux_shape, ctx.weight = aux.shape, weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.weight, device=grad.device, dtype=grad.dtype), None


class StageModule(nn.Module):
    """One pipeline stage: the embedding (first stage), its blocks, the final norm and
    head (last stage). It holds the model's own modules, so training it trains them."""

    def __init__(self, model: nn.Module, layers: list[int], first: bool, last: bool, aux_weight: float):
        super().__init__()
        self.embedding = model.embedding if first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in layers)
        self.norm, self.head = (model.norm, model.head) if last else (None, None)
        self.aux_weight, self.aux_values = aux_weight, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for block in self.blocks:
            x = block(x)
        aux = [a for a in (getattr(b, "aux_loss", lambda: None)() for b in self.blocks) if a is not None]
        if aux:
            total = torch.stack(aux).sum()
            self.aux_values.append(total.detach())
            if torch.is_grad_enabled():
                x = _AuxLoss.apply(x, total, self.aux_weight)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def load_stage_checkpoint(module: nn.Module, optimizers: list[Any], path: Path) -> dict[str, Any]:
    """Load this process's part of a distributed checkpoint folder (``state_dict``,
    ``optimizer_<i>`` flattened by parameter name, ``meta.pt``: Lightning's
    ModelParallelStrategy layout) into ``module`` and ``optimizers``; returns the rest
    of the checkpoint (loop and callback states)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    check_dcp_metadata(path)  # the index and every non-tensor entry, without pickle
    state = {"state_dict": get_model_state_dict(module)}
    with weights_only_loads():
        dcp.load(state, checkpoint_id=path)
    module.load_state_dict(state["state_dict"])
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    for i, opt in enumerate(optimizers):
        state = {f"optimizer_{i}": get_optimizer_state_dict(module, opt, options=flat)}
        with weights_only_loads():
            dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(module, opt, optim_state_dict=state[f"optimizer_{i}"], options=flat)
    return safe_torch_load(path / "meta.pt")


def pipeline_strategy(data_parallel: int, stages: int, backend: str | None, save_distributed_checkpoint: bool) -> Any:
    """Lightning's ModelParallelStrategy with a (data_parallel, pipeline) mesh (the class is
    defined here so that Lightning is imported only when training)."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh

    class _Strategy(ModelParallelStrategy):
        """Lightning's ModelParallelStrategy with a (data_parallel, pipeline) mesh."""

        def setup_environment(self) -> None:
            super().setup_environment()  # processes, and a (data_parallel, tensor_parallel) mesh we rename
            self._device_mesh = init_device_mesh(self.root_device.type, (data_parallel, stages),
                                                 mesh_dim_names=("data_parallel", "pipeline"))
            self.lightning_module._device_mesh = self._device_mesh

        # Each stage holds different parameters, so the optimizer's param_groups differ
        # per process: they are saved flattened, one entry per parameter name (torch's
        # default keeps one copy, rank 0's, which another stage could not load).
        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
            return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
                cpu_offload=True, flatten_optimizer_state_dict=True))

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            return load_stage_checkpoint(self.model, self.optimizers, Path(self.broadcast(checkpoint_path)))

    return _Strategy(data_parallel_size=data_parallel, tensor_parallel_size=stages,
                     save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=backend)


class Pipeline:
    """``stages`` processes in a pipeline (x ``stages_per_process`` virtual stages each
    for the interleaved schedule), ``data_parallel`` pipelines on different data."""

    requires: frozenset[str] = frozenset()
    uses_device_mesh = True  # parallelize() runs in LightningModule.configure_model with the mesh

    def __init__(self, stages: int = 2, data_parallel: int = 1, schedule: str = "1f1b", microbatches: int = 4,
                 split: str | list[int] = "balanced", stages_per_process: int = 1, backend: str = "auto",
                 save_distributed_checkpoint: bool = True, activation_checkpointing: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule={schedule!r} is not one of {list(SCHEDULES)}")
        self.pp, self.dp, self.virtual = int(stages), int(data_parallel), int(stages_per_process)
        self.schedule_name, self.microbatches, self.split = schedule, int(microbatches), split
        self.backend, self.save_distributed_checkpoint = backend, save_distributed_checkpoint
        self.activation_checkpointing = activation_checkpointing
        self.schedules: dict[int, Any] = {}
        self.stage_modules = self.group = None
        self.first = self.last = False
        self.objective: Any = None

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        problems = []
        pp, dp, virtual = node.get("stages"), node.get("data_parallel"), node.get("stages_per_process", 1)
        mb, schedule, split = node.get("microbatches"), node.get("schedule"), node.get("split")
        if not all(isinstance(v, int) and v >= 1 for v in (pp, dp, virtual, mb)):
            return [f"parallel.stages={pp!r}, parallel.data_parallel={dp!r}, parallel.stages_per_process={virtual!r} "
                    f"and parallel.microbatches={mb!r} must be positive integers"]
        devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
        if not isinstance(devices, int) or pp * dp != devices * nodes:
            problems.append(f"the mesh parallel.data_parallel={dp} x parallel.stages={pp} = {dp * pp} processes must "
                            f"equal the world trainer.devices={devices} x trainer.num_nodes={nodes}")
        if schedule not in SCHEDULES:
            problems.append(f"parallel.schedule={schedule!r} is not one of {list(SCHEDULES)}")
        elif (schedule == "interleaved_1f1b") != (virtual > 1):
            problems.append(f"parallel.schedule={schedule} needs parallel.stages_per_process "
                            f"{'>= 2' if virtual == 1 else '= 1'} (got {virtual}): only interleaved_1f1b runs "
                            "several stages per process")
        n_stages, layers = pp * virtual, cfg.model.get("n_layers")
        if isinstance(layers, int) and n_stages > layers:
            problems.append(f"{n_stages} pipeline stages (parallel.stages={pp} x parallel.stages_per_process={virtual}) "
                            f"but only model.n_layers={layers} layers: every stage needs at least one")
        if not (isinstance(split, str) and split == "balanced"):
            sizes = list(split) if not isinstance(split, str) else None
            if sizes is None or len(sizes) != n_stages or any(not isinstance(s, int) or s < 1 for s in sizes) \
                    or sum(sizes) != layers:
                problems.append(f"parallel.split={split!r} must be 'balanced' or a list of {n_stages} positive layer "
                                f"counts adding up to model.n_layers={layers}")
        batch = cfg.data.get("batch_size")
        if isinstance(batch, int) and batch % mb:
            problems.append(f"parallel.microbatches={mb} must divide data.batch_size={batch} (the batch of one pipeline)")
        if schedule != "gpipe" and mb < pp:
            problems.append(f"parallel.schedule={schedule} needs parallel.microbatches >= parallel.stages "
                            f"({mb} < {pp}): fewer micro-batches cannot fill the pipeline")
        objective = node_class(cfg.objective)
        reads = class_attr(cfg.objective, "reads") or frozenset({"logits", "aux_loss"})
        if objective is not None and ("hidden" in reads or "logits" not in reads or hasattr(objective, "prepare")):
            problems.append(f"objective._target_={cfg.objective._target_!r} "
                            + ("reads the model's hidden states" if "hidden" in reads else "runs the whole model itself "
                               "(prepare)") + ", but a pipeline's last stage computes only the logits of each "
                            "micro-batch: use parallel=fsdp or ddp")
        if cfg.model.get("tie_embeddings"):
            problems.append("model.tie_embeddings=true cannot be split: the embedding is on the first pipeline stage "
                            "and the head on the last")
        if cfg.trainer.get("compile"):
            problems.append("trainer.compile=true is not supported with parallel=pipeline yet")
        if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            problems.append("trainer.accumulate_grad_batches must be 1 with parallel=pipeline: raise "
                            "parallel.microbatches and data.batch_size instead")
        return problems

    def lightning_strategy(self) -> Any:
        return pipeline_strategy(self.dp, self.pp, None if self.backend == "auto" else self.backend,
                                       self.save_distributed_checkpoint)

    # -------------------------------------------------------------- building the stages
    def layer_split(self, model: nn.Module) -> list[int]:
        n_stages = self.pp * self.virtual
        if isinstance(self.split, str):
            costs = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
            head = sum(p.numel() for p in model.head.parameters()) + sum(p.numel() for p in model.norm.parameters())
            return balanced_split(costs, n_stages, model.embedding.weight.numel(), head)
        return [int(n) for n in self.split]

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module:
        pp_mesh = device_mesh["pipeline"]
        self.group, rank = pp_mesh.get_group(), pp_mesh.get_local_rank()
        sizes = self.layer_split(model)
        n_stages = len(sizes)
        starts = [sum(sizes[:s]) for s in range(n_stages)]
        self.mine = [s for s in range(n_stages) if s % self.pp == rank]  # interleaved: stages r, r + pp, ...
        self.n_stages, self.first, self.last = n_stages, 0 in self.mine, n_stages - 1 in self.mine
        self.stage_modules = [StageModule(model, list(range(starts[s], starts[s] + sizes[s])), s == 0,
                                          s == n_stages - 1, aux_weight=1.0) for s in self.mine]
        held = {i for s in self.mine for i in range(starts[s], starts[s] + sizes[s])}
        owner = [s for s in range(n_stages) for _ in range(sizes[s])]
        for i in range(len(model.blocks)):  # drop what the other stages hold
            if i not in held:
                model.blocks[i] = Elsewhere(owner[i])
        if not self.first:
            model.embedding = None
        if not self.last:
            model.norm = model.head = None
        for stage in self.stage_modules:
            for block in stage.blocks:
                if self.activation_checkpointing:
                    checkpointed(block)
            if self.dp > 1:  # FSDP x pipeline: shard each stage over the data-parallel processes
                for block in stage.blocks:
                    shard(block, device_mesh, reshard_after_forward=True)
                shard(stage, device_mesh, reshard_after_forward=False)
        self.device = next(model.parameters()).device
        self.schedules: dict[int, Any] = {}
        # the last stage reports each micro-batch's outputs (aligned with the batch's rows) to _loss
        self.pp_rank_of_last = dist.get_global_rank(self.group, (n_stages - 1) % self.pp)
        return model

    def schedule_for(self, width: int) -> Any:
        """The schedule for inputs of ``width`` tokens (stages infer their buffer shapes once)."""
        if width not in self.schedules:
            from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                      ScheduleInterleaved1F1B)

            stages = [PipelineStage(m, s, self.n_stages, self.device, group=self.group)
                      for m, s in zip(self.stage_modules, self.mine)]
            if self.schedule_name == "interleaved_1f1b":
                self.schedules[width] = ScheduleInterleaved1F1B(stages, n_microbatches=self.microbatches,
                                                                loss_fn=self._loss)
            else:
                cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
                self.schedules[width] = cls(stages[0], n_microbatches=self.microbatches, loss_fn=self._loss)
        return self.schedules[width]

    # -------------------------------------------------------------- one step
    def _loss(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The objective's loss on one micro-batch: ``rows`` are its batch rows."""
        part = batch_rows(self._batch, rows)
        loss = self.objective.loss(ModelOutput(logits=logits[:, : self._width]), part)
        share = batch_weight(self.objective, part) / self._weight  # this part's share of the batch
        self._parts.append((loss, share.detach()))
        return loss.value * share * self.microbatches  # the schedule divides by the micro-batch count

    def _run(self, objective: Any, batch: dict[str, torch.Tensor], train: bool) -> Loss:
        x = model_inputs(objective, batch)
        self.objective, self._batch, self._width, self._parts = objective, batch, x.shape[1], []
        self._rows = torch.arange(batch_size(batch), device=x.device)
        self._weight = batch_weight(objective, batch).float()
        width = next((w for w in sorted(self.schedules) if w >= x.shape[1]), x.shape[1])
        if width > x.shape[1]:  # right-pad to a width the stages know (causal: earlier positions unchanged)
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        for stage in self.stage_modules:
            stage.aux_weight = getattr(objective, "aux_loss_weight", 1.0)
            stage.aux_values = []
        schedule = self.schedule_for(width)
        args = (x,) if self.first else ()
        kw = {"target": self._rows, "losses": []} if self.last else {}
        (schedule.step if train else schedule.eval)(*args, **kw)
        # the last stage has the losses and metrics, every stage its aux losses: combine over the pipeline
        aux = sum((torch.stack(s.aux_values).mean() for s in self.stage_modules if s.aux_values), torch.zeros(()))
        aux = aux.float().cpu()
        dist.all_reduce(aux, group=self.group)
        # (the stages' first run infers shapes and may call the loss once more: keep the last parts)
        summary = [combine(self._parts[-self.microbatches:]) if self.last else None]
        dist.broadcast_object_list(summary, src=self.pp_rank_of_last, group=self.group)
        value, measure, metrics = summary[0]
        metrics = {k: Metric(torch.tensor(v, device=x.device), r) for k, (v, r) in metrics.items()}
        if aux != 0:  # some stage has blocks with an auxiliary loss
            metrics["aux_loss"] = Metric(aux.to(x.device))
        weight = getattr(objective, "aux_loss_weight", 1.0)
        return Loss(torch.tensor(value, device=x.device) + weight * aux.to(x.device), metrics,
                    measure=None if measure is None else torch.tensor(measure, device=x.device))

    def train_step(self, module: Any, batch: dict[str, torch.Tensor]) -> Loss:
        """One optimizer step on ``batch`` through the schedule (manual optimization)."""
        module.optimizers().zero_grad()
        loss = self._run(module.objective, batch, train=True)
        module.clip_and_step(group=self.group)  # the norm over every stage's gradients
        return loss

    @torch.no_grad()
    def eval_step(self, module: Any, batch: dict[str, torch.Tensor]) -> Loss:
        return self._run(module.objective, batch, train=False)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every stage's weights, gathered on each process (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # (cpu_offload would leave the dict empty on every process but global rank 0)
        mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        mine = {k: v.detach().cpu() for k, v in mine.items()}
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, mine, group=self.group)
        return {k: v for part in parts for k, v in part.items()}


def combine(parts: list[tuple[Loss, torch.Tensor]]) -> tuple[float, float | None, dict[str, tuple[float, str]]]:
    """Micro-batch losses -> the batch's (value, measure, {metric: (value, reduce)}): means
    weighted by each part's share of the batch, sums added up."""
    value = float(sum(loss.value.detach().float() * share for loss, share in parts))
    measure = None if parts[0][0].measure is None else \
        float(sum(loss.measure.float() * share for loss, share in parts))
    metrics: dict[str, tuple[float, str]] = {}
    for name in parts[0][0].metrics:
        found = [(as_metric(loss.metrics[name]), share) for loss, share in parts]
        reduce = found[0][0].reduce
        total = sum(float(m.value) * (1 if reduce == "sum" else float(share)) for m, share in found)
        metrics[name] = (total, reduce)
    return value, measure, metrics
