"""Crash safety for every training run: a non-finite guard and graceful signals.

Two Lightning callbacks, added to every run through ``llmzoo_callbacks``:

- ``NonFiniteGuard`` looks at the loss and the gradients before each optimizer step.
  A NaN/inf stops the run (``trainer.nan_policy=stop``) before the weights see it, or
  skips that update (``skip``, at most ``trainer.nan_max_skips`` times). A checkpoint of
  non-finite weights is never written, so the last finite one stays.
- ``GracefulStop`` turns SIGTERM (cluster preemption) and SIGINT (Ctrl-C) into a
  checkpoint at the next step boundary -- the same point as the periodic checkpoints,
  so a resume continues with exactly the step numbers and losses of an uninterrupted
  run -- and then an ``Interrupted`` error: exit code 143 / 130. A second signal of the
  same kind stops at once, mid-step, with the same exit code (the last checkpoint stays whole).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from llmzoo import hookimpl
from llmzoo.errors import Interrupted, NonFiniteError

log = logging.getLogger(__name__)
POLICIES = ("stop", "skip")


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True on every process if it is true on any (one collective when distributed)."""
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if trainer.world_size > 1 else flag


def _last_checkpoint(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class NonFiniteGuard(L.Callback):
    def __init__(self, policy: str = "stop", max_skips: int = 10, hints: str = ""):
        self.policy, self.max_skips, self.hints, self.skipped = policy, max_skips, hints, 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local))).float() if local else torch.zeros(())
        loss = getattr(pl_module, "last_loss", None)  # this step's loss (automatic optimization)
        pl_module.last_loss = None
        bad_loss = loss is not None and not bool(torch.isfinite(loss).all())
        if not _any_rank(trainer, bad_loss or not bool(torch.isfinite(norm))):
            return
        step = trainer.global_step + 1
        what = f"loss {float(loss) if loss is not None and loss.numel() == 1 else '?'}, gradient norm {float(norm)}"
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:  # the optimizer leaves parameters without gradients untouched
                for p in group["params"]:
                    p.grad = None
            log.warning("step %d: non-finite %s: update skipped (%d of at most trainer.nan_max_skips=%d)",
                        step, what, self.skipped, self.max_skips)
            return
        last = _last_checkpoint(trainer)
        kept = f"the last finite checkpoint is {last}" if last.exists() else "no checkpoint was written before it"
        limit = f" after {self.skipped} skipped updates (trainer.nan_max_skips={self.max_skips})" if self.skipped else ""
        raise NonFiniteError(f"training stopped at step {step}{limit}: non-finite {what}; the weights were not "
                             f"updated with it and {kept}. Likely causes: {self.hints}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(
                   v.to_local() if hasattr(v, "to_local") else v).all())]
        if _any_rank(trainer, bool(bad)):
            where = ", ".join(bad[:3]) or "on another process"
            raise NonFiniteError(f"step {trainer.global_step}: the weights hold NaN/inf ({where}); not writing a "
                                 f"checkpoint over the last finite one. Likely causes: {self.hints}")


class GracefulStop(L.Callback):
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signum:  # asked twice: stop now, mid-step (128 + N, as for the first)
            self._restore()
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}, without "
                                      "finishing the step; the last checkpoint written is whole")
        self.signum = signum
        log.warning("received %s: writing a checkpoint at the end of this step, then stopping (send it again to "
                    "stop at once)", signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    # The checkpoint is written at the end of a step (where the periodic ones are); the
    # stop comes at the start of the next, once Lightning has logged that step's row and
    # run any validation scheduled after it, so a resumed run logs exactly the rows left.
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.saved or not _any_rank(trainer, self.signum is not None):
            return
        self.signum = self.signum or signal.SIGTERM  # a process told by another one
        trainer.save_checkpoint(_last_checkpoint(trainer))  # a collective: every process is here
        self.saved = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.saved:
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.signum is not None:  # the signal came during the last step or its validation
            if not self.saved:
                trainer.save_checkpoint(_last_checkpoint(trainer))
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        raise Interrupted(self.signum, f"stopped by {signal.Signals(self.signum).name} after step "
                          f"{trainer.global_step}; resume with ckpt_path={_last_checkpoint(trainer)}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


def _hints(cfg: DictConfig) -> str:
    t, o = cfg.trainer, cfg.get("optim") or {}
    hints = [f"learning rate too high (optim.lr={o.get('lr')})"]
    if not t.get("gradient_clip_val"):
        hints.append("no gradient clipping (trainer.gradient_clip_val)")
    if "16" in str(t.get("precision")):
        hints.append(f"low-precision overflow (trainer.precision={t.get('precision')})")
    hints.append("bad input data or a too small model.norm_eps")
    return "; ".join(hints) + ". trainer.nan_policy=skip skips such steps"


@hookimpl
def llmzoo_callbacks(cfg: DictConfig) -> list[L.Callback]:
    t = cfg.trainer
    return [NonFiniteGuard(t.get("nan_policy", "stop"), t.get("nan_max_skips", 10), _hints(cfg)), GracefulStop()]


@hookimpl
def llmzoo_validate(cfg: DictConfig) -> list[str]:
    t = cfg.get("trainer") or {}
    problems = []
    if t.get("nan_policy", "stop") not in POLICIES:
        problems.append(f"trainer.nan_policy={t.get('nan_policy')!r} is not one of {list(POLICIES)}")
    skips = t.get("nan_max_skips", 10)
    if not isinstance(skips, int) or isinstance(skips, bool) or skips < 0:
        problems.append(f"trainer.nan_max_skips must be an integer >= 0, got {skips!r}")
    return problems
