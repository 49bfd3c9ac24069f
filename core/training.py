"""Training: one LightningModule (model + objective + AdamW/cosine) and ``train(cfg)``."""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .shared.flops import device_peak_flops, mfu
from .api import (CONFIG_FILE, TOKENIZER_DIR, Run, build_adapter, build_model, build_objective, build_strategy,
                  build_tokenizer, check_checkpoint_path, generate, load_foreign, load_local, prompt_ids,
                  safe_torch_load, save_final, tokenizer_files, weights_only_loads)
from .config import packing_of, validate_config
from .data import data_rank
from .errors import CheckpointError, Interrupted, NonFiniteError, RunFolderError, UserError
from .model import LanguageModel
from .interfaces import (BlockExtras, DataModuleExtras, Metric, Objective, ObjectiveExtras, ParallelStrategy,
                         StrategyExtras, Tokenizer, TokenizerExtras, TrainSampler, as_metric)
from .losses import batch_weight, model_inputs, run_objective
from .shared.sharding import clip_grad_norm_
from .plugins import get_plugin_manager

log = logging.getLogger(__name__)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (dim >= 2: linear and embedding weights) decay; norms and biases do not."""
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fusable(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW (one kernel over every parameter; on CPU a model=small
    step takes 8 ms instead of 32) can take these parameters: plain floating tensors on one
    device. Sharded runs (DTensor parameters) keep the per-tensor loop."""
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    return (bool(params) and len({p.device for p in params}) == 1
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compile_blocks(model: LanguageModel) -> LanguageModel:
    """``torch.compile`` each block in place: parameter names (and so checkpoints) do not
    change, and a block that cannot be compiled falls back to eager inside dynamo."""
    for block in model.blocks:
        block.compile()
    log.info("compiled %d blocks with torch.compile", len(model.blocks))
    return model


def ready_model(model: LanguageModel, strategy: ParallelStrategy, mesh: Any, *, compile: bool) -> LanguageModel:
    """The one order a built model is made ready to train in: the strategy's ``parallelize``
    (inside: tensor parallel, activation checkpointing, FSDP2 per block, as torchtitan), then
    with ``trainer.compile`` each block compiled in place (torchtitan compiles before FSDP;
    FSDP2 takes both). Parameter names, and so checkpoints, do not change."""
    model = cast(LanguageModel, strategy.parallelize(model, mesh))  # its blocks stay ``model.blocks``
    return compile_blocks(model) if compile else model


def metric_sources(model: nn.Module) -> list[Any]:
    """The submodules that report training statistics through ``metrics()``."""
    return [m for m in model.modules() if m is not model and BlockExtras.of(m).metrics is not None]


def block_metrics(sources: list[Any]) -> dict[str, Metric]:
    """What ``sources`` report through ``metrics()`` (e.g. MoE expert load), combined over
    layers as each metric says: averaged, or added up when ``summed``."""
    found: dict[str, list[Metric]] = {}
    for m in sources:
        for k, v in m.metrics().items():
            found.setdefault(k, []).append(as_metric(v))
    out = {}
    for k, ms in found.items():
        values = torch.stack([torch.as_tensor(m.value) for m in ms])
        out[k] = Metric(values.sum(0) if ms[0].reduce == "sum" else values.mean(0), ms[0].reduce)
    return out


class LMModule(L.LightningModule):
    """Model + objective + optimizer. ``run_info`` (resolved config, tokenizer files)
    is stored in every checkpoint so that one ``.ckpt`` rebuilds the run."""

    def __init__(self, model: LanguageModel, objective: Objective, optim: dict[str, Any], max_steps: int,
                 run_info: dict[str, Any] | None = None, clip_val: float | None = None,
                 strategy: ParallelStrategy | None = None, compile: bool = False):
        super().__init__()
        # Every strategy's parallelize() runs in configure_model (given Lightning's device
        # mesh when it asks for one: FSDP, TP, pipeline); then the blocks are compiled.
        self._strategy, self._compile = strategy, compile
        self.model, self.objective = model, objective
        # An objective that takes several optimizer steps per batch (PPO's epochs over a
        # rollout) says ``manual_optimization = True`` and steps through ``train_step(module,
        # batch)``, stepping with module.clip_and_step(loss). So does a
        # strategy whose step is more than forward + backward (a pipeline schedule): its
        # ``train_step(module, batch)`` and ``eval_step(module, batch)`` run the batch.
        self._objective_extras, strategy_extras = ObjectiveExtras.of(objective), StrategyExtras.of(strategy)
        self._uses_mesh = strategy_extras.uses_device_mesh
        self._train_step = (self._objective_extras.train_step if self._objective_extras.manual_optimization
                            else strategy_extras.train_step)
        self._eval_step = strategy_extras.eval_step
        self.automatic_optimization = self._train_step is None
        self.clip_val = clip_val
        # An objective with its own parameters (value head, Medusa heads) trains with the model.
        self.objective_module = objective if isinstance(objective, nn.Module) else None
        self.optim, self.max_steps, self.run_info = optim, max_steps, run_info or {}
        self._t0 = self._tokens = self._width = None
        self.last_loss: torch.Tensor | None = None
        self._metric_sources = metric_sources(model)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = run_objective(self.model, self.objective, batch)
            if self.trainer.world_size > 1 and self._objective_extras.weight is not None:
                # a mean over every process's tokens, as one process takes it: the processes count
                # different tokens (packed documents, padding) and their gradients are averaged
                w = batch_weight(self.objective, batch).float().to(loss.value.device)
                total = self.trainer.strategy.reduce(w.clone(), reduce_op="sum")
                loss.value = loss.value * w * self.trainer.world_size / total
            self.last_loss = loss.value.detach()  # read by callbacks before the optimizer step (NaN guard)
        else:
            assert self._train_step is not None
            loss = self._train_step(self, batch)
        self.log("train_loss", loss.value, prog_bar=True, sync_dist=self.trainer.world_size > 1)
        self.log_metrics("train/", loss.metrics)
        self.log_metrics("", block_metrics(self._metric_sources))
        if self._objective_extras.prepare is None:  # throughput: the tokens the model reads
            inputs = model_inputs(self.objective, batch)
            self._width = inputs.shape[1]
            self._tokens = (self._tokens or 0) + inputs.numel() * data_rank(self.trainer)[1]
        return loss.value if self.automatic_optimization else None

    def log_metrics(self, prefix: str, metrics: dict[str, Any], sums: bool = True) -> None:
        """Log ``metrics`` reduced over processes as each says: averaged, or added up
        (a tensor- or pipeline-parallel group sees one batch: its sum counts it once)."""
        sync = self.trainer.world_size > 1
        share = data_rank(self.trainer)[1] / self.trainer.world_size
        for k, v in metrics.items():
            m = as_metric(v)
            if m.reduce == "sum":
                if sums:
                    self.log(f"{prefix}{k}", torch.as_tensor(m.value, dtype=torch.float32) * share, sync_dist=sync,
                             reduce_fx="sum")
            else:
                self.log(f"{prefix}{k}", m.value, sync_dist=sync)

    def clip_and_step(self, loss: torch.Tensor | None = None, group: Any = None) -> None:
        """One manual optimizer step: zero the gradients, backward ``loss`` (None: the
        gradients are already there -- a pipeline schedule ran the backward), clip to
        ``trainer.gradient_clip_val`` (over every process of ``group`` when the model is
        split across it), step the optimizer and the LR schedule."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        assert not isinstance(opt, list) and isinstance(sched, torch.optim.lr_scheduler.LRScheduler)  # one each
        if loss is not None:
            opt.zero_grad()
            self.manual_backward(loss)
        if self.clip_val:
            if group is not None or self._mixed_layouts:
                clip_grad_norm_(self.parameters(), self.clip_val, group=group)
            else:
                # Lightning's own pattern passes its LightningOptimizer wrapper here
                self.clip_gradients(opt, gradient_clip_val=self.clip_val,  # type: ignore[arg-type]
                                    gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and self._mixed_layouts:
            clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @functools.cached_property
    def _mixed_layouts(self) -> bool:
        """Plain tensors beside DTensors, or DTensors on more than one layout (tensor
        parallel): torch's clipping refuses those, ours handles them. Layouts are fixed
        once configure_model has run, so this is asked once."""
        from torch.distributed.tensor import DTensor

        kinds = {(p.device_mesh, p.placements) if isinstance(p, DTensor) else None for p in self.parameters()}
        return len(kinds) > 1

    def configure_model(self):
        if self._strategy is None:  # already done (configure_model may be called again)
            return
        mesh = self.device_mesh if self._uses_mesh else None
        self.model = ready_model(self.model, self._strategy, mesh, compile=self._compile)
        self._strategy = None
        self._metric_sources = metric_sources(self.model)  # the blocks this process still holds

    def on_fit_start(self):
        hook = self._objective_extras.on_fit_start  # e.g. DPO precomputing reference log-probs
        if hook is not None:
            hook(self)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._tokens = time.perf_counter(), 0
            self._flops = self.model.flops_per_token(self._width) if self._width else None
            self._peak, how = None, ""
            if self._flops and self.trainer.world_size == 1:  # MFU: single process, blocks that count FLOPs
                self._peak, how = device_peak_flops(self.device)
                log.info("model: %.3g forward FLOPs/token; device peak %.3g FLOP/s (%s)", self._flops, self._peak, how)
        elif self._width and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            tps = self._tokens / (time.perf_counter() - self._t0)
            self.log("tokens_per_s", tps)
            if self._peak:
                self.log("mfu", mfu(tps, self._flops, self._peak))

    def validation_step(self, batch, batch_idx):
        # The objective's own measure (cross-entropy for clm), without auxiliary terms such
        # as MoE balance losses, so that different blocks compare on equal terms.
        loss = self._eval_step(self, batch) if self._eval_step else run_objective(self.model, self.objective, batch)
        measure = loss.measure if loss.measure is not None else loss.value
        self.log("val_loss", measure, prog_bar=True, sync_dist=self.trainer.world_size > 1)
        self.log_metrics("val/", loss.metrics, sums=False)  # e.g. DPO's reward accuracy on held-out pairs

    def configure_optimizers(self):
        o = self.optim
        modules = [self.model] + ([self.objective_module] if self.objective_module is not None else [])
        groups = param_groups(modules, o["weight_decay"])
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fusable(groups))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o["warmup_steps"], self.max_steps, o["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # Resume at the data position: skip the batches of this epoch that the run already saw.
        sampler = DataModuleExtras.of(getattr(self.trainer, "datamodule", None)).train_sampler
        sampler = sampler if isinstance(sampler, TrainSampler) else None  # a plain one cannot resume mid-epoch
        # `processed` counts batches whose step ran (checkpoints are written before
        # `completed` is incremented, so that one lags by a batch).
        seen = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
        if sampler is not None and self.automatic_optimization and self.global_step:
            # The position follows from the optimizer steps taken: Lightning counts an epoch as
            # done when a run stops at max_steps, so a finished run trained further would
            # otherwise start a fresh epoch instead of going on with the one it was in.
            per_epoch = len(sampler) // sampler.batch_size
            epoch, seen = divmod(self.global_step * self.trainer.accumulate_grad_batches, per_epoch)
            sampler.epoch_offset = epoch - self.current_epoch
        if sampler is not None and seen:
            sampler.start_batch = seen
            log.info("resuming at epoch %d, batch %d", self.current_epoch + sampler.epoch_offset, seen)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["llmzoo"] = self.run_info
        pending = self._pending_row()
        if pending:
            checkpoint["llmzoo_pending_row"] = pending

    def _pending_row(self) -> dict[str, float] | None:
        """The metrics row of the step just taken, when Lightning has yet to log it: a
        checkpoint written at the end of a training batch comes before that row, so a kill
        in between would lose it. It travels in the checkpoint; a resume writes it if
        metrics.csv lacks it (``_AppendingWriter``)."""
        t = self._trainer
        if t is None or not t.training or t.state.fn != "fit":
            return None
        conn = t._logger_connector
        if conn._first_loop_iter is None or not conn.should_update_logs:
            return None
        if self.automatic_optimization and t.fit_loop._should_accumulate():
            return None
        row = {k: float(v) for k, v in conn.metrics["log"].items() if torch.is_tensor(v) and v.numel() == 1}
        return {**row, "epoch": t.current_epoch, "step": t.fit_loop.epoch_loop._batches_that_stepped} if row else None


class SaveOnCrash(Callback):
    """Writes ``last.ckpt`` when training stops on an exception (Ctrl-C included), so
    that ``ckpt_path=<run_dir>/checkpoints/last.ckpt`` resumes it. (Lightning's own
    OnExceptionCheckpoint would also make every later fit resume silently.)"""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Not after a NaN (the last finite checkpoint stays) nor a signal (already saved at a step boundary).
        if trainer.global_step == 0 or isinstance(exception, (NonFiniteError, Interrupted, CheckpointError)):
            return
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            # Saving is a collective: when one process failed alone, the others never join.
            log.error("process %d failed (%s: %s); not writing %s (the other processes may not be there to "
                      "save with it): resume from the last periodic checkpoint", trainer.global_rank,
                      type(exception).__name__, exception, self.path.name)
            return
        trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the destination folder, fsynced, then
    renamed over the old one: a kill at any moment leaves the previous complete file
    (and no temporary one once the next save runs). Loads are ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            # a full disk is ENOSPC from the file, or torch's zip writer failing ("unexpected pos")
            if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
                    isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e))):
                raise CheckpointError(f"{path}: the checkpoint could not be written (no space left on the device?: "
                                      f"{str(e).strip().splitlines()[0][:200]}); the previous one (if any) is "
                                      f"unchanged. Free space under {path.parent}") from None
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location or "cpu")


# ----------------------------------------------------------------------------- run folders
# What makes a folder hold a run (a run that failed before training left only config.yaml).
RUN_ARTIFACTS = ("checkpoints", "metrics.csv", "model.safetensors", "run_summary.json")
LOCK_FILE = ".llmzoo.lock"


class RunLock:
    """One live run per run folder: an exclusive ``flock`` on ``<run_dir>/.llmzoo.lock``
    (released by the OS when the process dies, so a killed run never leaves it stuck),
    holding the owner's pid and host for the message a second run gets."""

    def __init__(self, run_dir: Path):
        self.path, self.fh = run_dir / LOCK_FILE, cast("IO[str] | None", None)

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise RunFolderError(f"run_dir={self.path.parent} is in use by a live run ({owner}); "
                                 "choose another run_dir or wait for it to finish") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock
            self.fh = None


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A fresh run refuses a folder that holds another run's results unless it resumes
    (``ckpt_path=``) or says ``overwrite=true`` (then the old results are removed)."""
    import shutil

    found = [name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if not found or cfg.get("ckpt_path"):
        return
    if not cfg.get("overwrite"):
        raise RunFolderError(f"run_dir={run_dir} already holds a run ({', '.join(found)}): resume it with "
                             f"ckpt_path={run_dir}/checkpoints/last.ckpt, choose another run_dir, or pass "
                             "overwrite=true to replace it")
    for name in (*RUN_ARTIFACTS, CONFIG_FILE, TOKENIZER_DIR, "model.json", "objective.safetensors", "tensorboard",
                 "clean_data", "adapter", "wandb", "mlflow.db", "eval"):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    log.warning("overwrite=true: removed the earlier run's results from %s", run_dir)


# Keys whose stored value wins on resume (restored state), and keys that must not change
# (the model's shape, and what fixes the data order: seed, sequence and batch sizes).
RESTORED_ON_RESUME = ("optim.",)
FIXED_ON_RESUME = ("model.", "block.", "tokenizer.", "objective.", "parallel.", "peft", "seed", "data.seq_len",
                   "data.batch_size")
IGNORED_ON_RESUME = ("run_dir", "ckpt_path", "overwrite", "sample.", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "trainer.progress_refresh_rate")


def resume_changes(stored: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that are reported, changes that are refused) between the config stored in
    a checkpoint and the config of the run resuming it."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    a, b = flat(stored), flat(now)
    told, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>") or key.startswith(IGNORED_ON_RESUME):
            continue
        change = f"{key}: {a.get(key, '<unset>')!r} in the checkpoint, {b.get(key, '<unset>')!r} now"
        if key.startswith(FIXED_ON_RESUME):
            refused.append(change)
        elif key.startswith(RESTORED_ON_RESUME):
            told.append(f"{change} -> the checkpoint's value wins (its optimizer and schedule state are restored)")
        else:
            told.append(f"{change} -> the new value is used")
    return told, refused


def check_resume(cfg: DictConfig) -> tuple[int | None, dict[str, float] | None]:
    """Before a resume: the checkpoint is safe to load, and what changed is said (or
    refused). Returns the checkpoint's step where it records one, and the metrics row it
    carries for the step before (``LMModule._pending_row``)."""
    path = Path(cfg.ckpt_path)
    check_checkpoint_path(path)
    meta = path / "meta.pt" if path.is_dir() else path
    # mmap: the config is read without reading the weights (Lightning loads them next)
    ckpt = safe_torch_load(meta, mmap=True) if meta.exists() else {}
    step = ckpt.get("global_step")
    pending = ckpt.get("llmzoo_pending_row") if isinstance(ckpt.get("llmzoo_pending_row"), dict) else None
    stored = (ckpt.get("llmzoo") or {}).get("config")
    if not isinstance(stored, dict):
        return step, pending
    now = cast(dict, OmegaConf.to_container(cfg, resolve=True))
    if cfg.get("init_from"):  # the starting run set these when the run began: its tokenizer, and
        # with a source a plugin resolved (hf:<folder>) its model and block as well
        keys = ("tokenizer",) if Path(cfg.init_from).exists() else ("model", "block", "tokenizer")
        now.update({k: stored.get(k) for k in keys})
    told, refused = resume_changes(stored, now)
    if refused:
        raise RunFolderError(f"ckpt_path={path}: the resuming run changes settings fixed by the checkpoint:\n  "
                             + "\n  ".join(refused) + "\nstart a new stage with init_from= instead")
    for change in told:
        log.warning("resume: %s", change)
    return step, pending


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends instead,
    after dropping the rows of steps from ``resume_step`` on (logged after that checkpoint
    by a run that was then killed: the resumed run logs them again)."""

    def __init__(self, log_dir: str, resume_step: int | None = None, pending: dict[str, float] | None = None):
        self.resume_step, self.pending = resume_step, pending
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        self.metrics_keys = rows[0] if rows else []
        if self.resume_step is None or "step" not in self.metrics_keys:
            return
        col = self.metrics_keys.index("step")
        kept = [r for r in rows[1:] if not (len(r) > col and r[col].isdigit() and int(r[col]) >= self.resume_step)]
        pending = self.pending or {}
        restore = bool(pending) and str(pending["step"]) not in {r[col] for r in kept if len(r) > col}
        if restore:  # killed between the checkpoint and the logging of its step's row
            self.metrics_keys += [k for k in pending if k not in self.metrics_keys]
            kept.append(["" if pending.get(k) is None else str(pending[k]) for k in self.metrics_keys])
        if len(kept) < len(rows) - 1 or restore:
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows([self.metrics_keys, *kept])
            os.replace(tmp, path)
            log.info("metrics.csv: dropped %d rows logged after the checkpoint (step >= %d)%s",
                     len(rows) - 1 - len(kept) + bool(restore), self.resume_step,
                     "; wrote the checkpointed step's row, which the interrupted run had not" if restore else "")


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<run_dir>/metrics.csv``: rows reach the file as they are logged
    (nothing lost to a kill), and a resumed run keeps the rows before its checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, pending: dict[str, float] | None = None):
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
        self.resume_step, self.pending = resume_step, pending

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:  # an _AppendingWriter
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step, self.pending)
        return self._experiment


def build_trainer(cfg: DictConfig, run_dir: Path, strategy: ParallelStrategy, manual: bool = False,
                  resume: tuple[int | None, dict | None] = (None, None)) -> L.Trainer:
    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=t.checkpoint_every,
                        save_top_k=1, enable_version_counter=False),
        SaveOnCrash(ckpt_dir / "last.ckpt"),
    ]
    if t.val_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                         save_top_k=1, enable_version_counter=False))
    for extra in get_plugin_manager().hook.llmzoo_callbacks(cfg=cfg):
        callbacks.extend(extra or [])
    if t.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=t.get("progress_refresh_rate", 10)))
    loggers = [RunCSVLogger(run_dir, *resume), *build_loggers(cfg, run_dir)]
    return L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.get("num_nodes", 1), precision=t.precision, strategy=strategy.lightning_strategy(),
        # manual optimization (PPO) clips and accumulates itself
        gradient_clip_val=None if manual else t.gradient_clip_val,
        accumulate_grad_batches=1 if manual else t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every or None,
        check_val_every_n_epoch=None if t.val_every else 1, limit_val_batches=t.limit_val_batches if t.val_every else 0,
        num_sanity_val_steps=0, enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=loggers,
        default_root_dir=str(run_dir), deterministic=t.get("deterministic", False),
        use_distributed_sampler=False,  # our sampler splits the data across ranks itself
        enable_model_summary=t.get("enable_model_summary", True), plugins=[AtomicCheckpointIO()],
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The ``logger=`` group's Lightning loggers, each writing under the run folder
    (``save_dir`` is relative to it), each given the resolved config as hyper-parameters."""
    loggers = []
    params = _flat(OmegaConf.to_container(cfg, resolve=True))
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        save_dir = run_dir / str(node.get("save_dir") or "")
        try:
            logger = instantiate(node, save_dir=str(save_dir), _convert_="all")
            logger.log_hyperparams(params)  # starts the logger's run (imports its library)
        except Exception as e:  # noqa: BLE001 - most often the logging library is not installed
            raise UserError(f"logger.{name} ({node._target_}) cannot start: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        loggers.append(logger)
    return loggers


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim/lr": 0.003, ...}: scalars as they are, lists as text (every logger takes these)."""
    out: dict[str, Any] = {}
    for k, v in (node.items() if isinstance(node, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; everything goes into ``cfg.run_dir``. Returns a summary dict.
    The run folder is locked for the run's lifetime (one live run per folder)."""
    validate_config(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = check_resume(cfg) if cfg.get("ckpt_path") else (None, None)
    if not _launched_first():  # processes started by a launcher for a run that rank 0 owns
        return _train(cfg, run_dir, resume)
    with RunLock(run_dir):
        claim_run_dir(cfg, run_dir)
        return _train(cfg, run_dir, resume)


def _launched_first() -> bool:
    """Whether this is the process a user started (global rank 0), not one that
    Lightning's launcher, torchrun or SLURM started beside it."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _train(cfg: DictConfig, run_dir: Path, resume: tuple[int | None, dict | None]) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    start = None
    if cfg.get("init_from"):  # a previous stage
        start = load_foreign(cfg.init_from)
        if start is not None:  # e.g. hf:<folder>: it brings its own architecture and tokenizer
            with open_dict(cfg):
                cfg.model, cfg.block, cfg.tokenizer = start.cfg.model, start.cfg.block, start.cfg.tokenizer
            log.info("init_from=%s: model, block and tokenizer come from it", cfg.init_from)
        else:
            start = load_local(cfg.init_from)
            theirs = OmegaConf.to_container(start.cfg.tokenizer, resolve=True)
            if theirs != OmegaConf.to_container(cfg.tokenizer, resolve=True):
                log.warning("init_from=%s: training with its tokenizer (%s), not tokenizer=%s; the run records it",
                            cfg.init_from, start.cfg.tokenizer.get("_target_"), cfg.tokenizer.get("_target_"))
                with open_dict(cfg):
                    cfg.tokenizer = start.cfg.tokenizer
    tokenizer = start.tokenizer if start else build_tokenizer(cfg)
    if cfg.data.get("packing") == "auto":  # resolved and recorded where the stack keeps documents apart
        cfg.data.packing = packing_of(cfg)
    data = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed, work_dir=str(run_dir), _convert_="all")
    if not TokenizerExtras.of(tokenizer).is_trained:
        data.prepare_data()  # trains the tokenizer; its vocabulary size sizes the model
    tokenizer.save(run_dir / TOKENIZER_DIR)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    model = build_model(cfg, vocab_size=start.model.vocab_size if start else tokenizer.vocab_size, adapters=False)
    if start:
        init_weights(model, start.model, cfg.init_from)
    adapter = build_adapter(cfg)  # peft=lora: adapters on the starting weights, which freeze
    if adapter:
        model = adapter.apply(model)
        log.info("adapters: %.3fM trainable parameters", sum(p.numel() for p in model.parameters()
                                                             if p.requires_grad) / 1e6)
    strategy = build_strategy(cfg)
    log.info("model: %.3fM parameters (%s)", model.num_parameters() / 1e6, cfg.block._target_)
    run_info = {"config": cast(dict, OmegaConf.to_container(cfg, resolve=True)), "tokenizer": tokenizer_files(tokenizer),
                "vocab_size": model.vocab_size}
    objective = build_objective(cfg, model, tokenizer)
    module = LMModule(model, objective, cast(dict, OmegaConf.to_container(cfg.optim, resolve=True)), cfg.trainer.max_steps,
                      run_info, clip_val=cfg.trainer.gradient_clip_val, strategy=strategy,
                      compile=bool(cfg.trainer.get("compile")))
    trainer = build_trainer(cfg, run_dir, strategy, manual=not module.automatic_optimization,
                            resume=resume)
    sharded = bool(cfg.get("ckpt_path")) and Path(cfg.ckpt_path).is_dir()  # DCP: checked, and fenced
    try:
        with weights_only_loads() if sharded else contextlib.nullcontext():
            trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    finally:
        for logger in trainer.loggers:  # end wandb's run: the next run in this process gets its own
            finish = getattr(getattr(logger, "_experiment", None), "finish", None)
            if callable(finish):
                finish()

    d = cfg.data
    n_params = model.num_parameters()
    # weights + gradients + two AdamW moments in fp32; on CUDA the measured peak as well
    memory = {"train_state_mb": n_params * 4 * 4 / 2**20}
    if torch.cuda.is_available() and str(trainer.strategy.root_device).startswith("cuda"):
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    summary = {"run_dir": str(run_dir), "step": trainer.global_step, "parameters": n_params, **memory,
               "data_parallel": data_rank(trainer)[1],  # replicas that each read their own batches
               "tokens_seen": trainer.global_step * d.batch_size * d.seq_len * cfg.trainer.accumulate_grad_batches
               * data_rank(trainer)[1], "flops_per_token": model.flops_per_token(d.seq_len),
               **{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
    summary.update(per_process_memory(module))
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # collective: every rank calls it
    final = unsharded(module.model, cfg, strategy)  # collective for sharded models; the model itself otherwise
    if trainer.is_global_zero:
        save_final(run_dir, final, objective)
        if adapter:
            adapter.save(final, run_dir / "adapter")
        (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if cfg.get("sample") and cfg.sample.get("prompts"):
            summary["samples"] = sample_text(final, tokenizer, cfg, objective)
    return summary


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nelement() * t.element_size() for t in tensors)


def per_process_memory(module: LMModule) -> dict[str, float]:
    """Bytes of parameters and optimizer state this process holds (its shards under FSDP)."""
    opt = module.trainer.optimizers[0] if module.trainer.optimizers else None
    states = [v for s in (opt.state.values() if opt else []) for v in s.values() if torch.is_tensor(v)]
    return {"param_mb_per_process": _local_bytes(module.model.parameters()) / 2**20,
            "optimizer_mb_per_process": _local_bytes(states) / 2**20}


def unsharded(model: LanguageModel, cfg: DictConfig, strategy: ParallelStrategy | None = None) -> LanguageModel:
    """A plain single-process copy of a sharded (DTensor) or pipelined model, gathered on
    rank 0 (a collective); an unsharded model is returned as it is. A strategy that
    splits the model otherwise gathers it with its ``full_state_dict(model)``."""
    from torch.distributed.tensor import DTensor

    gather = StrategyExtras.of(strategy).full_state_dict
    if gather is None and not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = gather(model) if gather else get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = build_model(cfg, vocab_size=model.vocab_size)
    if full:  # rank 0 (the others get an empty dict)
        plain.load_state_dict(full)
    return plain


def init_weights(model: nn.Module, source: nn.Module, where: str) -> None:
    """Start from another run's weights; the shapes must match exactly."""
    theirs, ours = source.state_dict(), model.state_dict()
    wrong = [f"{k}: {tuple(theirs[k].shape)} there, {tuple(v.shape)} here" for k, v in ours.items()
             if k in theirs and theirs[k].shape != v.shape]
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if wrong or missing or extra:
        raise CheckpointError(f"init_from={where}: its model does not fit this config (use the same model= and block= "
                         f"options as that run). Shape differences: {wrong[:5]}; missing: {missing[:5]}; "
                         f"unexpected: {extra[:5]}")
    model.load_state_dict(theirs)
    log.info("initialised from %s", where)


def sample_text(model: LanguageModel, tokenizer: Tokenizer, cfg: DictConfig, objective: Objective | None = None) -> list[str]:
    """Continue each of ``cfg.sample.prompts`` with the configured decoder and print it."""
    run = Run(model.eval(), tokenizer, cfg, objective if isinstance(objective, nn.Module) else None)
    room = model.max_seq_len - max(len(p) for p in prompt_ids(tokenizer, cfg.sample.prompts))
    outs = generate(run, None, list(cfg.sample.prompts), max_new_tokens=min(cfg.sample.max_new_tokens, room))
    texts = [p + o for p, o in zip(cfg.sample.prompts, outs)]
    for t in texts:
        print(f"--- sample ---\n{t}")
    return texts
