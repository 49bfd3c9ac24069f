"""Command-line entry points: ``llmzoo-train``, ``llmzoo-generate`` and ``llmzoo``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, open_dict

from .config import (CONF_PACKAGE, Rule, check_device, check_settings, list_options, shadowed_options,
                     validate_config)
from .errors import Interrupted, UserError, debug, reported
from .interfaces import DecoderExtras
from .shared.prompts import prompts_from, typed_prompt
from .plugins import get_plugin_manager

log = logging.getLogger("llmzoo")
CONF = f"pkg://{CONF_PACKAGE}"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("💡 Tip") or msg.startswith("`weights_only` was not set"))


def _quiet_libraries() -> None:
    """No downloads, one copy of each log line (Hydra's handlers), no advertising."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Our sampler restores the data position itself (tests/test_train.py checks it).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    logging.getLogger("llmzoo").setLevel(logging.INFO)
    logging.getLogger("llmzoo_plugins").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()  # Lightning adds its own handler when imported before logging is set up
        lg.propagate = True
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropTips())


def _is_multirun() -> bool:
    try:
        mode = HydraConfig.get().mode
        return mode is not None and mode.name == "MULTIRUN"
    except ValueError:
        return False


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def _train_app(cfg: DictConfig) -> dict[str, Any] | float:
    from .training import train

    return run_job(cfg, train, "llmzoo-train")


def run_job(cfg: DictConfig, work: Callable[[DictConfig], dict[str, Any]], prog: str) -> dict[str, Any] | float:
    """Run one job (a training run or a benchmark) in its Hydra folder; in a sweep a
    failure is recorded and the sweep goes on. ``work`` validates the config itself."""
    global _ENTERED
    _ENTERED = True
    _quiet_libraries()
    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = hc.runtime.output_dir
    run_dir = Path(cfg.run_dir)
    overrides = list(hc.overrides.task)
    try:
        summary = work(cfg)  # which validates the config (once: llmzoo.train does)
    except Interrupted as e:
        if _is_multirun():  # the sweep stops here; its summary says which jobs did not finish
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RESULT_FILE).write_text(json.dumps({"status": "interrupted", "overrides": overrides,
                                                           "run_dir": str(run_dir), "error": str(e)}))
            write_sweep_summary(Path(hc.sweep.dir), interrupted=True)
        raise
    except Exception as e:
        if not _is_multirun():
            if isinstance(e, UserError) and not debug():
                print(f"{prog}: {e}", file=sys.stderr)
                sys.exit(e.exit_code)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC and not debug():  # metrics, final weights
                print(f"{prog}: no space left on the device writing {e.filename or 'a file'} (the last checkpoint is "
                      "whole: free space, then resume with ckpt_path=)", file=sys.stderr)
                sys.exit(1)
            raise
        # In a sweep one failing job must not stop the others: record it and go on.
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "FAILED").write_text(traceback.format_exc())
        log.error("job in %s failed: %s: %s", run_dir, type(e).__name__, e)
        result: dict[str, Any] = {"status": "failed", "overrides": overrides, "run_dir": str(run_dir),
                  "error": f"{type(e).__name__}: {e}"}
    else:
        result = {"status": "ok", "overrides": overrides, "run_dir": str(run_dir),
                  **{k: v for k, v in summary.items() if k not in ("samples", "config", "versions")}}
    if _is_multirun():  # the sweep summary is built from these files, whichever launcher ran the job
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).write_text(json.dumps(result, default=str))
    metric = cfg.get("optimize_metric")
    if metric:  # what a sweeper (Optuna) optimises; a failed job is the worst value
        value = result.get(metric)
        if value is None and result["status"] == "ok":
            raise KeyError(f"optimize_metric={metric!r} is not in the run summary "
                           f"(there: {sorted(k for k, v in result.items() if isinstance(v, (int, float)))})")
        return float("inf") if value is None else float(value)
    return result


RESULT_FILE = "result.json"


class SweepSummary(HydraCallback):
    """Hydra callback: at the end of a sweep, gathers every job's ``result.json`` into
    ``summary.json`` in the sweep folder, and exits non-zero if any job failed. Reading
    files (not in-process state) makes it work with launchers that run jobs in other
    processes or on other machines (joblib, submitit)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if write_sweep_summary(Path(config.hydra.sweep.dir)):
            sys.exit(1)


def write_sweep_summary(sweep_dir: Path, interrupted: bool = False) -> list[dict[str, Any]]:
    """``summary.json``: every job's result (a job without one is marked failed; after a
    signal, a last entry says that the later jobs were not started). Returns the jobs
    that did not finish ok."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for job_dir in sorted((p.parent for p in sweep_dir.glob("*/.hydra")), key=_job_number):
        result = job_dir / RESULT_FILE
        jobs.append(json.loads(result.read_text()) if result.exists() else
                    {"status": "failed", "run_dir": str(job_dir), "error": "the job ended without a result"})
    if interrupted:
        jobs.append({"status": "not started", "error": "the sweep was stopped by a signal: later jobs did not run"})
    (sweep_dir / "summary.json").write_text(json.dumps(jobs, indent=2, default=str))
    failed = [j for j in jobs if j.get("status") != "ok"]
    word = "interrupted" if interrupted else "finished"
    print(f"sweep {word}: {len(jobs) - len(failed)} ok, {len(failed)} not ok; see {sweep_dir / 'summary.json'}")
    for j in failed:
        print(f"  {j['status'].upper()} {' '.join(j.get('overrides', [j.get('run_dir', '')]))}: {j.get('error')}",
              file=sys.stderr)
    return failed


def _job_number(job_dir: Path) -> tuple[int, str]:
    head = job_dir.name.split("_", 1)[0]
    return (int(head), job_dir.name) if head.isdigit() else (1 << 30, job_dir.name)


_ENTERED = False  # whether Hydra got as far as our code (else its exit 1 is a config error)


def hydra_entry(prog: str, app: Callable[[], Any]) -> None:
    """Run a Hydra app: user errors print one message (exit 2, 3 for NaN, 128+N for a
    signal); Hydra's own composition errors (an unknown option or key) exit 2 as well."""
    try:
        with reported(prog):
            app()
    except KeyboardInterrupt:
        if debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        if e.code == 1 and not _ENTERED:
            sys.exit(2)
        raise


def train_main() -> None:
    """llmzoo-train [overrides...]: train a model (``--help`` lists the config groups)."""
    hydra_entry("llmzoo-train", _train_app)


@hydra.main(config_path=CONF, config_name="generate", version_base="1.3")
def _generate_app(cfg: DictConfig) -> None:
    global _ENTERED
    _ENTERED = True
    with reported("llmzoo-generate"):  # inside Hydra, which would print its own traceback-free exit 1
        _generate(cfg)


GENERATE_RULES = {"max_new_tokens": Rule(int, 0), "chat": Rule(bool), "save_quantized": Rule(bool)}


def _generate(cfg: DictConfig) -> None:
    from .api import build_decoder, generate_ids, load_run, prompt_ids, ready_decoder
    from .shared.decoding import quantized

    _quiet_libraries()
    if cfg.run_dir is None:
        raise UserError("give run_dir=<folder of a training run>")
    check_settings(cfg, GENERATE_RULES)
    device = check_device(cfg.device)
    run = load_run(cfg.run_dir, cfg.checkpoint)
    model, tokenizer, run_cfg = run.model, run.tokenizer, run.cfg
    with open_dict(run_cfg):
        run_cfg.decoder = cfg.decoder
    validate_config(run_cfg)
    decoder = build_decoder(run_cfg)
    model = model.to(device)
    if cfg.get("quantize"):
        model = quantized(model, cfg.quantize, Path(cfg.run_dir), reuse=cfg.checkpoint is None,
                          save=bool(cfg.get("save_quantized")))
    run = run._replace(model=model)
    try:
        decoder = ready_decoder(run, decoder)
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = prompts_from(cfg, _TYPED_PROMPT)
    ids = prompt_ids(tokenizer, prompts, chat=bool(cfg.get("chat")))
    t0 = time.perf_counter()
    outs = generate_ids(run, decoder, ids, max_new_tokens=cfg.max_new_tokens)
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        print(p + tokenizer.decode(o))
    n = sum(len(o) for o in outs)
    # every figure the decoder reports (DecoderExtras.stats), e.g. "accepted per step 2.41"
    extra = "".join(f", {k.replace('_', ' ')} {v:.2f}" for k, v in DecoderExtras.of(decoder).stats.items()
                    if isinstance(v, (int, float)))
    print(f"[{n} tokens in {dt:.2f}s: {n / dt:.1f} tokens/s{extra}]", file=sys.stderr)


_TYPED_PROMPT: str | None = None  # the prompt as typed on the command line (``--`` or ``prompt=``)


def generate_main() -> None:
    """llmzoo-generate run_dir=<folder> [prompt=... | -- free text | prompt_file=...] max_new_tokens=N ..."""
    global _TYPED_PROMPT
    sys.argv[1:], _TYPED_PROMPT = typed_prompt(sys.argv[1:])
    hydra_entry("llmzoo-generate", _generate_app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmzoo", description="llmzoo: combine plugins into LLMs. Training: llmzoo-train; "
        "generation: llmzoo-generate. Plugins add commands (llmzoo_commands hook).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list every config option and the package that provides it")
    p.add_argument("--group", help="only this config group")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    get_plugin_manager().hook.llmzoo_commands(subparsers=sub)  # import-hf, export-hf, merge-adapter, ...
    args = parser.parse_args(argv)
    if args.command == "plugins":
        return _plugins(args.group, args.json)
    with reported(f"llmzoo {args.command}"):
        _quiet_libraries()
        args.run(args)
    return 0


def settings(items: list[str], allowed: set[str], required: set[str]) -> dict[str, str]:
    """key=value arguments, checked against the allowed keys."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise UserError(f"argument {item!r}: expected key=value with key one of {sorted(allowed)}")
        out[key] = value
    if required - set(out):
        raise UserError(f"missing {', '.join(f'{k}=...' for k in sorted(required - set(out)))}")
    return out


def _plugins(group: str | None, as_json: bool) -> int:
    pm = get_plugin_manager()
    options = [o for o in list_options() if group in (None, o.group)]
    if as_json:
        print(json.dumps({"options": [o.__dict__ for o in options],
                          "plugins": [i.__dict__ for i in pm.infos.values()],
                          "errors": [e.__dict__ for e in pm.errors]}, indent=2))
        return 1 if pm.errors else 0
    width = max((len(o.group) + len(o.name) for o in options), default=10) + 3
    current = None
    for o in options:
        if o.group != current:
            print(f"\n{o.group}/")
            current = o.group
        print(f"  {o.group}={o.name}".ljust(width + 4), f"[{o.distribution}]")
    print("\nplugins: " + ", ".join(f"{i.name} ({i.distribution}{f', contract {i.contract}' if i.contract else ''})"
                                    for i in pm.infos.values()))
    for winner, other in shadowed_options():
        print(f"WARNING: {winner.group}={winner.name} from package {other!r} is shadowed by the one from "
              f"{winner.distribution!r} (first on the config search path): rename it to use it", file=sys.stderr)
    for e in pm.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if pm.errors else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
