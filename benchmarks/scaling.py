"""Fit L(N, D) = E + A/N^alpha + B/D^beta to a finished sweep and report it.

    llmzoo-train experiment=scaling run_dir=runs/scaling
    python benchmarks/scaling.py runs/scaling [--budget 1e15]

Reads the sweep's summary.json (parameters N, tokens seen D, final val_loss), prints
the fit, its residuals and the compute-optimal N and D for a FLOP budget, and writes
scaling_fit.json, scaling_fit.md and scaling_fit.png into the sweep folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llmzoo_plugins.report import fit_scaling_law


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--budget", type=float, default=1e15, help="training FLOPs for the compute-optimal split")
    p.add_argument("--delta", type=float, default=1e-3,
                   help="Huber delta on log-loss residuals (Chinchilla: 1e-3; larger is closer to least squares, "
                        "steadier on small sweeps)")
    args = p.parse_args()
    sweep = Path(args.sweep_dir)
    jobs = [j for j in json.loads((sweep / "summary.json").read_text()) if j.get("status") == "ok" and "val_loss" in j]
    if len(jobs) < 5:
        raise SystemExit(f"{sweep}: {len(jobs)} finished runs with a val_loss; a fit needs at least 5")
    N = np.array([j["parameters"] for j in jobs], dtype=float)
    D = np.array([j["tokens_seen"] for j in jobs], dtype=float)
    L = np.array([j["val_loss"] for j in jobs], dtype=float)
    fit = fit_scaling_law(N, D, L, delta=args.delta)
    pred = fit.predict(N, D)
    n_opt, d_opt = fit.compute_optimal(args.budget)
    lines = [f"L(N, D) = {fit.E:.3f} + {fit.A:.4g} / N^{fit.alpha:.3f} + {fit.B:.4g} / D^{fit.beta:.3f}",
             f"(Huber loss {fit.huber_loss:.3g} with delta {args.delta:g}; {len(jobs)} runs)", "",
             "| N (params) | D (tokens) | val loss | fit | residual |", "|---|---|---|---|---|"]
    for n, d, l, q in sorted(zip(N, D, L, pred)):
        lines.append(f"| {n:,.0f} | {d:,.0f} | {l:.4f} | {q:.4f} | {l - q:+.4f} |")
    lines += ["", f"Compute-optimal for C = {args.budget:.3g} FLOPs (C = 6ND): N = {n_opt:,.0f}, D = {d_opt:,.0f} "
                  f"(predicted loss {fit.predict(n_opt, d_opt):.3f}). Extrapolating from tiny CPU runs: a "
                  f"sanity check of the pipeline, not a forecast."]
    report = "\n".join(lines)
    print(report)
    (sweep / "scaling_fit.md").write_text(report + "\n")
    (sweep / "scaling_fit.json").write_text(json.dumps({**fit.as_dict(), "budget": args.budget, "N_opt": n_opt,
                                                        "D_opt": d_opt}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    grid = np.geomspace(D.min() / 1.5, D.max() * 1.5, 100)
    for n, color in zip(sorted(set(N)), plt.cm.viridis(np.linspace(0, 0.9, len(set(N))))):
        sel = N == n
        ax.scatter(D[sel], L[sel], color=color, label=f"N = {n / 1e3:.0f}k params")
        ax.plot(grid, fit.predict(n, grid), color=color, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(sweep / "scaling_fit.png", dpi=120)
    print(f"wrote {sweep / 'scaling_fit.png'}")


if __name__ == "__main__":
    main()
