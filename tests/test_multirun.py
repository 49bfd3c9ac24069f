"""Hydra multirun sweeps through the real CLI."""

import json
from pathlib import Path

import pytest

from conftest import FAST, run_cli

SHORT = [*FAST, "trainer.max_steps=3", "trainer.val_every=3", "trainer.log_every_n_steps=1", "data.batch_size=4",
         "data.max_val_sequences=16"]


def test_two_by_two_sweep_writes_four_run_folders(tmp_path):
    out = run_cli("llmzoo-train", "-m", "block=dense", "seed=0,1", "model.n_layers=1,2", f"run_dir={tmp_path}", *SHORT)
    runs = sorted(p.parent for p in tmp_path.glob("*/config.yaml"))
    assert len(runs) == 4, out.stdout
    for r in runs:
        assert (r / "metrics.csv").exists() and (r / "checkpoints" / "last.ckpt").exists()
        assert (r / "model.safetensors").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [j["status"] for j in summary] == ["ok"] * 4 and all(j["step"] == 3 for j in summary)

    # llmzoo-report: one table grouped by the swept keys, and the plots
    report = run_cli("llmzoo-report", str(tmp_path)).stdout
    assert "Swept: model.n_layers, seed; 4 jobs, 0 failed." in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and " ok " in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1", "0"], ["| 1", "1"], ["| 2", "0"], ["| 2", "1"]]
    for name in ("loss_vs_step", "loss_vs_flops", "throughput", "memory"):
        assert (tmp_path / f"report_{name}.png").stat().st_size > 5000, name


def test_one_failing_job_keeps_the_others(tmp_path):
    out = run_cli("llmzoo-train", "-m", "model.n_heads=3,4", f"run_dir={tmp_path}", *SHORT, check=False)
    assert out.returncode == 1
    jobs = json.loads((tmp_path / "summary.json").read_text())
    bad, good = ([j for j in jobs if f"model.n_heads={h}" in j["overrides"]][0] for h in (3, 4))
    assert bad["status"] == "failed" and "does not divide" in bad["error"]
    assert (Path(bad["run_dir"]) / "FAILED").exists()
    assert good["status"] == "ok" and (Path(good["run_dir"]) / "model.safetensors").exists()
    assert "FAILED model.n_heads=3" in out.stderr


@pytest.mark.slow  # ~30 s; the other sweep tests cover multirun in the default run
def test_every_block_trains_with_falling_loss_in_one_sweep(tmp_path):
    blocks = "dense,moe,mamba,mamba2,hybrid"
    run_cli("llmzoo-train", "-m", f"block={blocks}", f"run_dir={tmp_path}", *FAST, "trainer.max_steps=40",
            "trainer.val_every=20", "trainer.log_every_n_steps=10", "data.max_val_sequences=32")
    jobs = json.loads((tmp_path / "summary.json").read_text())
    assert [j["status"] for j in jobs] == ["ok"] * 5
    import csv

    for j in jobs:
        rows = [float(r["val_loss"]) for r in csv.DictReader(open(Path(j["run_dir"]) / "metrics.csv"))
                if r.get("val_loss")]
        assert len(rows) == 2 and rows[1] < rows[0] < 5.6, (j["overrides"], rows)


@pytest.mark.slow  # ~16 s; the default run sweeps with Hydra's basic launcher
def test_parallel_sweep_with_the_joblib_launcher(tmp_path):
    """Jobs run in worker processes; the summary is still complete (it is built from files)."""
    run_cli("llmzoo-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
            f"run_dir={tmp_path}", *SHORT)
    jobs = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(j["overrides"][0] for j in jobs) == ["seed=0", "seed=1"]
    assert all(j["status"] == "ok" and j["step"] == 3 for j in jobs)
