"""llmzoo-bench records (train / decode / memory), decode sweeps through llmzoo-report,
and the Optuna hyper-parameter search config."""

import json

import pytest
import yaml

import llmzoo

from conftest import FAST, run_cli


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_train_and_memory_records(tmp_path):
    out = tmp_path / "bench.jsonl"
    run_cli("llmzoo-bench", "bench.kind=train", "trainer.max_steps=12", "trainer.val_every=12",
            "trainer.log_every_n_steps=2", "trainer.limit_val_batches=2", f"bench.out={out}",
            f"run_dir={tmp_path / 'train'}", *FAST)
    from llmzoo_plugins.bench import run_bench  # the same record from this process (no command start-up)

    run_bench(llmzoo.compose("bench", ["bench.kind=memory", "data.batch_size=2", "data.seq_len=32", f"bench.out={out}",
                                       f"run_dir={tmp_path / 'mem'}"], validate=False))
    train, memory = records(out)
    for r in (train, memory):
        assert {"config", "device", "versions", "commit", "time"} <= set(r) and "torch" in r["versions"]
    assert train["kind"] == "train" and train["tokens_per_s"] > 0 and train["val_loss"] > 0
    tokens_per_step = train["config"]["data"]["batch_size"] * train["config"]["data"]["seq_len"]
    assert abs(train["step_ms"] - 1000 * tokens_per_step / train["tokens_per_s"]) < 1e-6 * train["step_ms"]
    assert train["config"]["trainer"]["max_steps"] == 12
    # AdamW keeps two fp32 moments per weight (and a step count); grads are weight-sized
    assert abs(memory["grads_mb"] - memory["weights_mb"]) < 1e-9
    assert 2 * memory["weights_mb"] <= memory["optimizer_mb"] < 2 * memory["weights_mb"] + 0.01
    assert memory["peak_memory_mb"] > 0


def test_bench_decode_sweep_reports_tokens_per_s_and_plots(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "bench.jsonl"
    run_cli("llmzoo-bench", "-m", "bench.kind=decode", "decoder=greedy,speculative", "bench.new_tokens=12",
            "bench.repeats=1", f"bench.out={out}", f"run_dir={sweep}")
    recs = records(out)
    assert len(recs) == 2 and all(r["tokens_per_s"] > 0 for r in recs)
    assert "accepted_per_step" in recs[1] and recs[1]["config"]["decoder"]["k"] == 4
    report = run_cli("llmzoo-report", str(sweep)).stdout
    assert "| decoder | status |" in report and "accepted/step" in report
    assert (sweep / "report_throughput.png").stat().st_size > 5000


def test_bench_rejects_an_unknown_kind(tmp_path):
    out = run_cli("llmzoo-bench", "bench.kind=speed", f"bench.out={tmp_path / 'b.jsonl'}",
                  f"run_dir={tmp_path}", check=False)
    assert out.returncode == 2 and "bench.kind='speed' is not one of ['train', 'decode', 'memory']" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # ~11 s: three trials through Hydra's Optuna sweeper
def test_optuna_search_minimises_validation_loss(tmp_path):
    sweep = tmp_path / "search"
    run_cli("llmzoo-train", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=3", "trainer.max_steps=10",
            "trainer.val_every=10", "trainer.limit_val_batches=2", f"run_dir={sweep}", *FAST)
    jobs = json.loads((sweep / "summary.json").read_text())
    assert len(jobs) == 3 and all(j["status"] == "ok" for j in jobs)
    lrs = {j["overrides"][[o.split("=")[0] for o in j["overrides"]].index("optim.lr")] for j in jobs}
    assert len(lrs) == 3  # the sampler proposed three different learning rates
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(j["val_loss"] for j in jobs)
