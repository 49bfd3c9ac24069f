"""Scaling-law fit and MFU helpers."""

import numpy as np
import pytest

from llmzoo.shared.flops import device_peak_flops, mfu
from llmzoo_plugins.report import ScalingFit, fit_scaling_law

pytest.importorskip("scipy")

TRUE = ScalingFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, huber_loss=0.0)  # Chinchilla's published fit


def test_fit_recovers_a_known_law():
    rng = np.random.default_rng(0)
    N, D = np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6))
    N, D = N.ravel(), D.ravel()
    L = TRUE.predict(N, D) * np.exp(rng.normal(0, 1e-3, N.shape))  # 0.1% noise
    grid = {"a": [0, 5, 10], "b": [0, 5, 10], "e": [-1, 0, 1], "alpha": [0.2, 0.5], "beta": [0.2, 0.5]}
    fit = fit_scaling_law(N, D, L, grid=grid)
    assert fit.alpha == pytest.approx(0.34, rel=0.05) and fit.beta == pytest.approx(0.28, rel=0.05)
    assert fit.E == pytest.approx(1.69, rel=0.02)
    assert np.max(np.abs(fit.predict(N, D) / L - 1)) < 5e-3
    n_opt, d_opt = fit.compute_optimal(1e21)
    assert 6 * n_opt * d_opt == pytest.approx(1e21, rel=1e-6)
    # the optimum really is the minimum along the iso-FLOP curve
    for k in (0.5, 2.0):
        assert TRUE.predict(n_opt, d_opt) < TRUE.predict(n_opt * k, d_opt / k)


def test_fit_needs_enough_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_scaling_law([1, 2], [3, 4], [5, 6])


def test_mfu_and_cpu_peak_probe():
    peak, how = device_peak_flops("cpu", probe_size=256)
    assert peak > 1e8 and "measured" in how
    assert mfu(tokens_per_s=1000, flops_per_token=1e6, peak_flops=3e9) == pytest.approx(1.0)


def test_scaling_report_script_on_a_sweep_summary(tmp_path):
    """benchmarks/scaling.py reads a sweep's summary.json and writes the fit, table and plot."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    N, D = np.meshgrid([4e4, 1.3e5, 4.4e5], [5e4, 1.5e5, 4.5e5])
    jobs = [{"status": "ok", "parameters": n, "tokens_seen": d, "val_loss": float(TRUE.predict(n, d))}
            for n, d in zip(N.ravel(), D.ravel())]
    jobs.append({"status": "failed", "error": "boom"})  # failed jobs are left out of the fit
    (tmp_path / "summary.json").write_text(json.dumps(jobs))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "9 runs" in out.stdout and "Compute-optimal" in out.stdout
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert fit["alpha"] == pytest.approx(0.34, rel=0.1) and fit["beta"] == pytest.approx(0.28, rel=0.1)
    assert (tmp_path / "scaling_fit.png").stat().st_size > 10_000
