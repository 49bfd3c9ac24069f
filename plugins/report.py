"""``llmzoo-report <sweep_dir>``: a sweep's runs as one markdown table, grouped by the
keys the sweep varied, and PNG plots (loss vs step, loss vs training FLOPs, throughput,
memory). Written into the sweep folder as report.md and report_*.png.

Also the scaling-law fit of a sweep (``fit_scaling_law``; benchmarks/scaling.py), after
Chinchilla (Hoffmann et al. 2022, "approach 3"):

    L(N, D) = E + A / N^alpha + B / D^beta

fitted by minimising the Huber loss (delta = 1e-3) between log L and
log(exp(a - alpha log N) + exp(b - beta log D) + exp(e)) with L-BFGS from a grid of
starting points, A = exp(a), B = exp(b), E = exp(e). With training compute C ~ 6 N D
the loss-optimal split of a budget C is

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber_loss: float

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the predicted loss at training compute ``flops`` = 6 N D."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return G * (flops / 6) ** (b / (a + b)), (flops / 6) ** (a / (a + b)) / G

    def as_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def fit_scaling_law(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, delta: float = 1e-3,
                    grid: dict[str, Sequence[float]] | None = None) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to observed (parameters, tokens, loss)."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if len(logL) < 5:
        raise ValueError(f"a scaling fit needs at least 5 runs (it has 5 parameters), got {len(logL)}")

    def objective(p):  # Huber loss and its gradient (analytic: L-BFGS needs hundreds of starts)
        a, b, e, alpha, beta = p
        terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
        pred = logsumexp(terms, axis=0)
        r = pred - logL
        dr = np.clip(r, -delta, delta)  # derivative of the Huber loss
        w = np.exp(terms - pred) * dr  # softmax weights of the three terms, times dH/dr
        grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * logN).sum(), -(w[1] * logD).sum()])
        return _huber(r, delta).sum(), grad

    grid = grid or {"a": [0, 5, 10, 20], "b": [0, 5, 10, 20], "e": [-1, 0, 1], "alpha": [0.2, 0.5, 1.0],
                    "beta": [0.2, 0.5, 1.0]}
    best = None
    for start in itertools.product(*grid.values()):
        res = minimize(objective, np.array(start, dtype=float), method="L-BFGS-B", jac=True)
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ScalingFit(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta),
                      float(best.fun))


def load_sweep(sweep: Path) -> list[dict[str, Any]]:
    """Jobs of ``summary.json`` with their overrides parsed and their metrics.csv rows."""
    path = sweep / "summary.json"
    if not path.exists():
        raise SystemExit(f"{sweep}: no summary.json (is it the run_dir of an `llmzoo-train -m` sweep?)")
    jobs = json.loads(path.read_text())
    for job in jobs:
        job["params"] = dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)
        metrics = Path(job.get("run_dir", "")) / "metrics.csv"
        job["rows"] = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for j in jobs for k in j["params"]})
    return [k for k in keys if len({j["params"].get(k) for j in jobs}) > 1]


def series(job: dict, column: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[column])) for r in job["rows"] if r.get(column)]


def last(job: dict, column: str) -> float | None:
    s = series(job, column)
    return s[-1][1] if s else None


def label(job: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={job['params'].get(k)}" for k in keys) or job.get("run_dir", "?")


def _sortable(value: str | None) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def throughput(job: dict) -> float | None:
    """Training tokens/s from metrics.csv, else the job's own figure (llmzoo-bench decode)."""
    return last(job, "tokens_per_s") or job.get("tokens_per_s")


# Columns shown when some job has them (llmzoo-bench decode / memory records).
EXTRA = [("ms_per_token", "ms/token", "{:.2f}"), ("accepted_per_step", "accepted/step", "{:.2f}"),
         ("peak_memory_mb", "peak MB", "{:.0f}")]


def table(jobs: list[dict], keys: list[str]) -> str:
    extra = [c for c in EXTRA if any(c[0] in j for j in jobs)]
    head = keys + ["status", "params", "final val loss", "tokens/s", "MFU", "train state MB"] + [c[1] for c in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in sorted(jobs, key=lambda j: [_sortable(j["params"].get(k)) for k in keys]):
        tps, mfu = throughput(j), last(j, "mfu")
        cells = [str(j["params"].get(k)) for k in keys] + [
            j.get("status", "?") if j.get("status") == "ok" else f"**{j.get('status')}**: {j.get('error', '')[:80]}",
            f"{j['parameters'] / 1e6:.3f}M" if "parameters" in j else "-",
            f"{j['val_loss']:.4f}" if j.get("val_loss") is not None else "-",
            f"{tps:.0f}" if tps else "-", f"{100 * mfu:.1f}%" if mfu else "-",
            f"{j['train_state_mb']:.1f}" if "train_state_mb" in j else "-"]
        cells += [fmt.format(j[key]) if j.get(key) is not None else "-" for key, _, fmt in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The headline figure of an evaluation task (llmzoo-eval writes <run_dir>/eval/results.json).
HEADLINE = ("bits_per_byte", "perplexity", "acc", "acc_norm", "exact_match", "acc,none", "exact_match,none",
            "word_perplexity,none", "bits_per_byte,none")


def eval_table(jobs: list[dict], keys: list[str]) -> str:
    """One column per evaluated task (its headline metric), one row per job with results."""
    found = {}
    for j in jobs:
        path = Path(j.get("run_dir", "")) / "eval" / "results.json"
        if path.exists():
            found[id(j)] = json.loads(path.read_text())
    if not found:
        return ""
    columns = []
    for results in found.values():
        for task, metrics in results.items():
            metric = next((m for m in HEADLINE if m in metrics), None)
            if metric and (task, metric) not in columns:
                columns.append((task, metric))
    head = keys + [f"{t} {m.split(',')[0]}" for t, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        if id(j) in found:
            r = found[id(j)]
            lines.append("| " + " | ".join([str(j["params"].get(k)) for k in keys] + [
                f"{r[t][m]:.4g}" if t in r and isinstance(r[t].get(m), (int, float)) else "-" for t, m in columns]) + " |")
    return "\n\n## Evaluation (llmzoo-eval)\n\n" + "\n".join(lines) + "\n"


def plots(jobs: list[dict], keys: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [j for j in jobs if j.get("status") == "ok"]
    files = []
    if not any(j["rows"] for j in ok):  # no training curves (e.g. decode benchmarks): bars only
        return files + _bars(plt, ok, keys, out)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j in ok:
        tr = series(j, "train_loss")
        line, = ax.plot([s for s, _ in tr], [v for _, v in tr], alpha=0.6, label=label(j, keys))
        va = series(j, "val_loss")
        ax.plot([s for s, _ in va], [v for _, v in va], "o--", color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss (lines) and validation loss (dots)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "report_loss_vs_step.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j in ok:
        if not j.get("flops_per_token") or not j.get("tokens_seen") or not j.get("step"):
            continue
        per_step = 3 * j["flops_per_token"] * j["tokens_seen"] / j["step"]
        va = series(j, "val_loss")
        ax.plot([(s + 1) * per_step for s, _ in va], [v for _, v in va], "o-", label=label(j, keys))
    ax.set(xscale="log", xlabel="training FLOPs (3 x forward)", ylabel="validation loss", title="loss vs compute")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    files.append(_save(fig, out / "report_loss_vs_flops.png"))
    return files + _bars(plt, ok, keys, out)


def _bars(plt, ok: list[dict], keys: list[str], out: Path) -> list[Path]:
    files = []
    training = any(j["rows"] for j in ok)
    for column, name, ylabel in (("tokens_per_s", "throughput", "training tokens/s" if training else "tokens/s"),
                                 ("train_state_mb", "memory", "weights + grads + AdamW state (MB)"),
                                 ("peak_memory_mb", "peak_memory", "peak memory (MB)")):
        vals = [(label(j, keys), throughput(j) if column == "tokens_per_s" else j.get(column)) for j in ok]
        vals = [(k, v) for k, v in vals if v]
        if not vals:
            continue
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(vals)))
        ax.barh([k for k, _ in vals], [v for _, v in vals], color="tab:blue")
        ax.set(xlabel=ylabel, title=name)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
        files.append(_save(fig, out / f"report_{name}.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmzoo-report", description=__doc__)
    p.add_argument("sweep_dir", help="the run_dir of an `llmzoo-train -m ...` sweep (holds summary.json)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    jobs = load_sweep(sweep)
    keys = swept_keys(jobs)
    text = f"# Sweep {sweep}\n\nSwept: {', '.join(keys) or '(nothing)'}; {len(jobs)} jobs, " \
           f"{sum(j.get('status') != 'ok' for j in jobs)} failed.\n\n{table(jobs, keys)}\n{eval_table(jobs, keys)}"
    if not args.no_plots:
        files = plots(jobs, keys, sweep)
        text += "\n" + "\n".join(f"![{f.stem}]({f.name})" for f in files) + "\n"
    (sweep / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
