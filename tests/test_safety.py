"""Trust boundary and crash safety: nothing a user loads runs code, NaN and signals stop
the run with a resumable, finite checkpoint, run folders are owned, and every user
error is one message with exit code 2 (no traceback)."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import llmzoo
from llmzoo.config import ConfigError
from llmzoo.errors import CheckpointError, DataError, NonFiniteError, RunFolderError
from conftest import BIN, FAST, run_cli, tiny_cfg


def cfg_for(run_dir, *overrides):
    cfg = tiny_cfg(*FAST, "trainer.val_every=0", *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "run"
    llmzoo.train(cfg_for(run, "trainer.max_steps=3", "trainer.checkpoint_every=2"))
    return run


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- loading
def test_malicious_pickle_is_refused_by_every_loader(tmp_path, tiny_run):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.ckpt"
    good = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**good, "payload": RunsCode(marker)}, bad)

    loaders = [lambda: llmzoo.load_checkpoint(bad), lambda: llmzoo.load_run(tiny_run, checkpoint=str(bad)),
               lambda: llmzoo.train(cfg_for(tmp_path / "a", f"init_from={bad}")),
               lambda: llmzoo.train(cfg_for(tmp_path / "b", f"ckpt_path={bad}"))]
    for load in loaders:
        with pytest.raises(CheckpointError, match="refused: loading it needs pickle"):
            load()
    proc = run_cli("llmzoo-generate", f"run_dir={tiny_run}", f"checkpoint={bad}", "prompt=hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "needs pickle" in proc.stderr
    assert not marker.exists(), "a loader ran the pickled command"


def test_pickle_free_checkpoint_cannot_instantiate_or_escape(tmp_path, tiny_run):
    good = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)

    def variant(name, change):
        ckpt = json.loads(json.dumps(good["llmzoo"]))
        change(ckpt)
        path = tmp_path / f"{name}.ckpt"
        torch.save({**good, "llmzoo": ckpt}, path)
        return path

    copied = tmp_path / "copied"
    target = variant("target", lambda c: c["config"]["tokenizer"].update(
        {"_target_": "shutil.copy", "src": str(tiny_run / "config.yaml"), "dst": str(copied)}))
    nested = variant("nested", lambda c: c["config"]["block"].update(
        {"evil": {"_target_": "torch.load", "f": "x"}}))
    escape_up = variant("escape_up", lambda c: c["tokenizer"].update({"../../escaped.txt": "x"}))
    escape_abs = variant("escape_abs", lambda c: c["tokenizer"].update({str(tmp_path / "abs.txt"): "x"}))
    for path, match in [(target, "shutil.copy"), (nested, "block.evil._target_='torch.load'"),
                        (escape_up, "not a plain file name"), (escape_abs, "not a plain file name")]:
        for load in (lambda: llmzoo.load_checkpoint(path),
                     lambda: llmzoo.train(cfg_for(tmp_path / f"init_{path.stem}", f"init_from={path}"))):
            with pytest.raises(CheckpointError, match=match.replace("(", r"\(").replace(".", r"\.")):
                load()
    assert not copied.exists() and not (tmp_path / "abs.txt").exists()
    assert not list(tmp_path.parent.glob("escaped.txt")) and not list(tmp_path.glob("escaped.txt"))

    # a run folder's config.yaml is a stored config too
    run = tmp_path / "run_copy"
    import shutil

    shutil.copytree(tiny_run, run)
    text = (run / "config.yaml").read_text().replace("llmzoo_plugins.tokenizers.ByteTokenizer", "os.system")
    (run / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="'os.system', which is not a class that an installed llmzoo plugin"):
        llmzoo.load_run(run)


def test_sharded_checkpoint_index_is_read_without_pickle(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from llmzoo.api import check_dcp_metadata

    folder = tmp_path / "sharded"
    dcp.save({"w": torch.ones(3), "nested": {"b": torch.zeros(2, dtype=torch.bfloat16)}}, checkpoint_id=folder)
    check_dcp_metadata(folder)  # DCP's own index passes
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="posix.system is not part of a checkpoint's metadata"):
        check_dcp_metadata(folder)
    with pytest.raises(CheckpointError, match="refused"):
        llmzoo.load_checkpoint(folder)
    assert not marker.exists()


def _sharded_copy(tiny_run, folder, optimizer_state):
    """A Lightning-style sharded checkpoint folder (what parallel=fsdp writes: DCP shards
    for the weights and the optimizer, meta.pt for the rest) made from tiny_run's."""
    import torch.distributed.checkpoint as dcp

    good = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    dcp.save({"state_dict": good["state_dict"], "optimizer_0": optimizer_state}, checkpoint_id=folder)
    torch.save({k: v for k, v in good.items() if k not in ("state_dict", "optimizer_states")}, folder / "meta.pt")
    return folder


def test_payload_in_a_shard_file_is_refused_by_every_loader(tmp_path, tiny_run):
    import shutil

    marker = tmp_path / "PWNED"
    fine = _sharded_copy(tiny_run, tmp_path / "fine.ckpt", {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]})
    run = llmzoo.load_checkpoint(fine)  # the honest folder loads: the check is not a blanket refusal
    assert run.model.vocab_size > 0
    evil = _sharded_copy(tiny_run, tmp_path / "evil.ckpt", {"param_groups": [{"lr": 0.1, "x": RunsCode(marker)}]})
    run_copy = tmp_path / "run_copy"
    shutil.copytree(tiny_run, run_copy)
    (run_copy / "checkpoints" / "last.ckpt").unlink()
    shutil.copytree(evil, run_copy / "checkpoints" / "last.ckpt")  # as parallel=fsdp names it
    loaders = [lambda: llmzoo.load_checkpoint(evil), lambda: llmzoo.load_run(run_copy, checkpoint="last"),
               lambda: llmzoo.train(cfg_for(tmp_path / "a", f"init_from={evil}")),
               lambda: llmzoo.train(cfg_for(tmp_path / "b", f"ckpt_path={evil}", "trainer.max_steps=4"))]
    for load in loaders:
        with pytest.raises(CheckpointError, match=r"\.ckpt/__0_0\.distcp \(entry 'optimizer_0\..*'\): refused"):
            load()
    proc = run_cli("llmzoo-generate", f"run_dir={tiny_run}", f"checkpoint={evil}", "prompt=hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "refused" in proc.stderr
    assert not marker.exists(), "a loader ran the pickled command"

    # and the fence behind the check: a load DCP does with weights_only=False stays weights_only
    import torch.distributed.checkpoint as dcp

    from llmzoo.api import weights_only_loads

    state = {"optimizer_0": {"param_groups": [{"lr": 0.0, "x": None}]}}
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's wrapper, a BaseException

    with weights_only_loads(), pytest.raises(CheckpointException, match="posix.system"):
        dcp.load(state, checkpoint_id=evil)
    assert not marker.exists()


def test_resolvers_in_stored_configs_never_run(tmp_path, tiny_run):
    import shutil

    marker = tmp_path / "CREATED"
    payload = "${oc.create:'{_target_: builtins.open, file: " + str(marker) + ", mode: w}'}"
    run = tmp_path / "run_copy"
    shutil.copytree(tiny_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("run_dir:", f"evil: \"{payload}\"\nrun_dir:", 1))
    good = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt = json.loads(json.dumps(good["llmzoo"]))
    ckpt["config"]["block"]["evil"] = payload
    bad = tmp_path / "resolver.ckpt"
    torch.save({**good, "llmzoo": ckpt}, bad)
    loaders = [lambda: llmzoo.load_run(run), lambda: llmzoo.load_checkpoint(bad),
               lambda: llmzoo.train(cfg_for(tmp_path / "a", f"init_from={bad}")),
               lambda: llmzoo.train(cfg_for(tmp_path / "b", f"init_from={run}"))]
    for load in loaders:
        with pytest.raises(CheckpointError, match="refused: the stored config has an interpolation at"):
            load()
    proc = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "interpolation" in proc.stderr
    assert not marker.exists(), "a stored config's resolver ran"


def test_truncated_and_corrupt_files_are_one_line(tmp_path, tiny_run):
    data = (tiny_run / "checkpoints" / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable checkpoint \(truncated or corrupt\?\)"):
        llmzoo.load_checkpoint(cut)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        llmzoo.load_run(run)
    proc = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a readable safetensors file" in proc.stderr


# ----------------------------------------------------------------------------- checkpoints and run folders
def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from llmzoo.training import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def dies_half_way(obj, fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert int(io.load_checkpoint(path)["step"]) == 1  # the previous checkpoint is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    (path.parent / f".last.ckpt.{os.getpid() + 1}.tmp").write_bytes(b"left by a killed run")
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    import errno

    def disk_full(obj, fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    def zip_writer_full(obj, fh):  # what torch's zip writer raises on most full disks
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 731")

    for full in (disk_full, zip_writer_full):
        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(CheckpointError, match=f"{path}: the checkpoint could not be written .no space left"):
            io.save_checkpoint({"step": torch.tensor(4)}, path)
        monkeypatch.setattr(torch, "save", real_save)
        assert int(io.load_checkpoint(path)["step"]) == 3
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_run_folder_is_owned(tmp_path, tiny_run, caplog):
    from llmzoo.training import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):  # a live run holds the folder
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            llmzoo.train(cfg_for(run, "trainer.max_steps=2"))
    llmzoo.train(cfg_for(run, "trainer.max_steps=2"))
    with pytest.raises(RunFolderError, match="already holds a run .* overwrite=true"):
        llmzoo.train(cfg_for(run, "trainer.max_steps=2"))
    assert llmzoo.train(cfg_for(run, "trainer.max_steps=3", "overwrite=true"))["step"] == 3
    assert json.loads((run / "run_summary.json").read_text())["step"] == 3

    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(RunFolderError, match=r"model\.dim: 64 in the checkpoint, 32 now"):
        llmzoo.train(cfg_for(run, "trainer.max_steps=4", f"ckpt_path={ckpt}", "model.dim=32"))
    with caplog.at_level("WARNING", logger="llmzoo.training"):
        assert llmzoo.train(cfg_for(run, "trainer.max_steps=4", f"ckpt_path={ckpt}", "optim.lr=0.5"))["step"] == 4
    assert "optim.lr: 0.003 in the checkpoint, 0.5 now -> the checkpoint's value wins" in caplog.text
    assert "trainer.max_steps: 3 in the checkpoint, 4 now -> the new value is used" in caplog.text


# ----------------------------------------------------------------------------- non-finite values
def test_nan_stops_without_overwriting_finite_weights(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training stopped at step \d+: non-finite .*optim\.lr=1000000\.0"):
        llmzoo.train(cfg_for(run, "optim.lr=1e6", "trainer.max_steps=50", "trainer.checkpoint_every=1"))
    assert not (run / "model.safetensors").exists()
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class NanGradAt:
    """A plugin whose callback poisons one gradient at the given steps."""

    def __init__(self, steps):
        self.steps = steps

    @llmzoo.hookimpl
    def llmzoo_callbacks(self, cfg):
        import lightning as L

        steps = self.steps

        class Poison(L.Callback):
            def on_after_backward(self, trainer, module):
                if trainer.global_step in steps:
                    next(module.model.parameters()).grad[0, 0] = float("nan")

        return [Poison()]


def test_nan_policy_skip_leaves_the_weights_untouched_then_stops_at_the_limit(tmp_path):
    from llmzoo.plugins import get_plugin_manager

    pm = get_plugin_manager()
    plugin = NanGradAt({2, 4, 5})
    pm.register(plugin, name="nan-test")
    try:
        summary = llmzoo.train(cfg_for(tmp_path / "skip", "trainer.max_steps=6", "trainer.nan_policy=skip",
                                       "trainer.nan_max_skips=3"))
        assert summary["step"] == 6  # three updates skipped, training went on
        run = llmzoo.load_run(tmp_path / "skip")
        assert all(torch.isfinite(p).all() for p in run.model.parameters())
        with pytest.raises(NonFiniteError, match=r"step 6 after 2 skipped updates \(trainer\.nan_max_skips=2\)"):
            llmzoo.train(cfg_for(tmp_path / "limit", "trainer.max_steps=6", "trainer.nan_policy=skip",
                                 "trainer.nan_max_skips=2"))
        with pytest.raises(NonFiniteError, match="step 3: non-finite loss"):
            llmzoo.train(cfg_for(tmp_path / "stop", "trainer.max_steps=6"))
    finally:
        pm.unregister(plugin)


# ----------------------------------------------------------------------------- signals
def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(fh)]


def _interrupt_then_resume(run, common, sig, rng, longest=1.0):
    """Start a run, send ``sig`` at a random moment (up to ``longest`` s) once it has
    checkpointed (mid-step, mid-validation or mid-write), check how it ended, resume it;
    False if it had finished."""
    proc = subprocess.Popen([str(BIN / "llmzoo-train"), f"run_dir={run}", *common], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = run / "checkpoints" / "last.ckpt"  # training has started: the signal handlers are in place
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, longest))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the signal came after the last step: the run had finished
        return False
    assert proc.returncode == 128 + sig if sig != signal.SIGKILL else proc.returncode == -signal.SIGKILL, err[-3000:]
    if sig != signal.SIGKILL:
        assert f"stopped by {sig.name} after step" in err and "Traceback" not in err
    run_cli("llmzoo-train", f"run_dir={run}", *common, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    return True


SIGNAL_COMMON = [*FAST, "trainer.max_steps=30", "trainer.log_every_n_steps=1", "trainer.val_every=7",
                 "trainer.limit_val_batches=2", "trainer.checkpoint_every=3", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("signals") / "straight"
    run_cli("llmzoo-train", f"run_dir={run}", *SIGNAL_COMMON)
    return _rows(run)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])  # SIGINT: SIGTERM's path
def test_signals_and_kill_then_resume_give_the_rows_of_an_uninterrupted_run(tmp_path, uninterrupted, sig):
    rng = random.Random(int(sig))
    for attempt in range(4):  # a signal that came after the last step is sent again, sooner
        run = tmp_path / f"{sig.name}_{attempt}"
        if _interrupt_then_resume(run, SIGNAL_COMMON, sig, rng, longest=1.0 / 2**attempt):
            assert _rows(run) == uninterrupted, f"{sig.name}: resumed rows differ from the uninterrupted run"
            return
    pytest.fail(f"{sig.name} never interrupted the run before it ended (4 tries)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_second_signal_stops_at_once_with_the_same_exit_code(tmp_path, sig):
    """A preempted job must never look like success: the second SIGTERM (or Ctrl-C) stops
    mid-step with 128 + N and one line, and the checkpoint already written still loads."""
    run = tmp_path / "run"
    # steps of ~1 s, so both signals (0.3 s apart: Python runs a handler once per delivery it
    # sees, and two that arrive within one long C call are one) land in the same step
    slow_steps = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "data.seq_len=128", "data.batch_size=16"]
    proc = subprocess.Popen([str(BIN / "llmzoo-train"), f"run_dir={run}", *FAST, *slow_steps, "trainer.max_steps=100000",
                             "trainer.val_every=0", "trainer.checkpoint_every=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
    proc.send_signal(sig)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and f"stopped at once by a second {sig.name}" in err, err[-3000:]
    assert llmzoo.load_checkpoint(run / "checkpoints" / "last.ckpt").model is not None


@pytest.mark.slow  # ~50 s; signals are tested on one process by default, FSDP resume by test_fsdp
@pytest.mark.distributed
def test_sigterm_on_two_fsdp_processes_then_resume_gives_the_same_rows(tmp_path):
    common = [*FAST, "parallel=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=8",
              "trainer.max_steps=16", "trainer.log_every_n_steps=1", "trainer.val_every=5",
              "trainer.limit_val_batches=2", "trainer.checkpoint_every=1000"]
    run_cli("llmzoo-train", f"run_dir={tmp_path / 'straight'}", *common)
    run = tmp_path / "stopped"
    assert _interrupt_then_resume(run, common, signal.SIGTERM, random.Random(1)), "the run ended before the signal"
    assert _rows(run) == _rows(tmp_path / "straight")


def test_sweep_stopped_by_sigterm_writes_its_summary(tmp_path):
    proc = subprocess.Popen([str(BIN / "llmzoo-train"), "-m", f"run_dir={tmp_path}", "seed=0,1", *FAST,
                             "trainer.max_steps=500", "trainer.val_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("0_*/checkpoints")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [j["status"] for j in summary] == ["interrupted", "not started"]
    assert "SIGTERM" in summary[0]["error"] and "sweep interrupted: 0 ok" in out


# ----------------------------------------------------------------------------- config and data errors
BAD_CONFIGS = [
    "model.dim=abc", "model.dim=0", "model.dim=-8", "model.n_layers=0", "model.n_layers=1.5", "model.max_seq_len=0",
    "model.n_heads=5", "model.n_heads=0", "model.n_kv_heads=3", "model.norm_eps=-1", "model.norm_eps=0",
    "model.init_std=-0.1", "model.rope_theta=0", "model.tie_embeddings=maybe", "model.ffn_hidden=-1",
    "model.vocab_size=0", "optim.lr=abc", "optim.lr=0", "optim.lr=-1", "optim.lr=inf", "optim.weight_decay=-0.1",
    "optim.eps=0", "optim.warmup_steps=-10", "optim.min_lr_ratio=2", "optim.betas=[0.9]", "optim.betas=[0.9,1.5]",
    "data.batch_size=0", "data.batch_size=abc", "data.seq_len=0", "data.seq_len=256", "data.val_fraction=1.5",
    "data.num_workers=-1", "data.skip_bad_records=sometimes", "+data.shuffle=true", "trainer.max_steps=0",
    "trainer.max_steps=abc", "trainer.checkpoint_every=0", "trainer.gradient_clip_val=-1",
    "trainer.accumulate_grad_batches=0", "trainer.log_every_n_steps=0", "trainer.val_every=-1",
    "trainer.limit_val_batches=-1", "trainer.limit_val_batches=1.5", "trainer.nan_policy=ignore",
    "trainer.nan_max_skips=-1", "trainer.compile=perhaps", "+trainer.logger=wandb", "+trainer.max_step=3",
    "+foo=1", "+optim.momentum=0.9", "+model.heads=4", "seed=-1", "sample.max_new_tokens=-1",
    "decoder=sample decoder.temperature=-1", "decoder=sample decoder.top_p=2", "decoder=sample decoder.top_k=-3",
    "decoder=sample decoder.top_k=abc", "decoder=medusa", "+decoder.beam=4", "objective=dpo", "objective=sft data=preferences",
    "block=hybrid block.mixers.attention.n_heads=5", "block=moe model.n_heads=5", "block=dense block.backend=magic",
    "trainer.precision=fp13", "trainer.accelerator=tpu9", "trainer.precision=true", "data.sample_by=word",
    "block=dense block.backend=flash",  # flash-attn cannot import here (tests/gpu covers where it does)
]


def test_config_fuzz_every_bad_config_is_one_message_naming_the_key():
    assert len(BAD_CONFIGS) >= 50
    silent, crashed = [], []
    for override in BAD_CONFIGS:
        try:
            llmzoo.compose(overrides=["model=tiny", *override.split()])
            silent.append(override)
        except ConfigError as e:
            key = override.split()[-1].lstrip("+").split("=")[0]
            leaf = key.split(".")[-1]
            named = key in str(e) or leaf in str(e) or any(w in str(e) for w in ("objective=", "decoder=medusa"))
            assert named, f"{override}: the message does not name {key}: {e}"
        except Exception as e:  # noqa: BLE001
            crashed.append(f"{override}: {type(e).__name__}: {e}")
    assert not silent and not crashed, f"passed silently: {silent}; crashed: {crashed}"


def _numeric_leaves(node, key):
    """(dotted key, value) of every int / float / bool leaf under ``node`` (interpolations
    and ``_target_`` keys left out)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        for k in node.keys():
            if str(k).startswith("_") or OmegaConf.is_interpolation(node, k):
                continue
            yield from _numeric_leaves(node._get_node(k), f"{key}.{k}")
    elif isinstance(node, ListConfig):
        return  # list-valued settings (betas, prompts) have rules of their own
    else:
        value = node._value() if hasattr(node, "_value") else node
        if isinstance(value, (int, float, bool)):
            yield key, value


def test_config_fuzz_every_numeric_key_of_every_training_option_is_type_checked():
    """Generated, not hand-listed: for every option of every training config group, each
    of its numeric or boolean settings set to a word is one ConfigError naming that key --
    never accepted, never a traceback later."""
    from omegaconf import OmegaConf, open_dict

    from llmzoo.config import list_options, validate_config

    groups = ("block", "objective", "decoder", "parallel", "data", "tokenizer", "model", "trainer", "optim")
    pairs, rl = ["data=preferences"], ["data=prompts", "reward=keyword"]
    companions = {  # what an option needs beside it to make a valid config
        **{("objective", o): pairs for o in ("dpo", "kto", "orpo", "simpo", "reward")},
        **{("objective", o): rl for o in ("grpo", "ppo", "rloo")}, ("objective", "distill"): rl,
        ("data", "preferences"): ["objective=dpo"], ("data", "prompts"): ["objective=grpo", "reward=keyword"],
        ("decoder", "eagle"): ["objective=eagle"], ("decoder", "medusa"): ["objective=medusa"],
        ("parallel", "fsdp_tp"): ["trainer.devices=4"]}
    options = [o for o in list_options() if o.group in groups]
    assert len(options) > 40
    checked, silent, crashed, alone = 0, [], [], []
    for opt in options:
        cfg = llmzoo.compose(overrides=["model=tiny", f"{opt.group}={opt.name}",
                                        *companions.get((opt.group, opt.name), [])], validate=False)
        try:
            validate_config(cfg)
        except ConfigError:  # an option that needs other settings with it (data=prompts, distill)
            alone.append(f"{opt.group}={opt.name}")
            continue
        for key, value in list(_numeric_leaves(cfg[opt.group], opt.group)):
            bad = OmegaConf.create(OmegaConf.to_container(cfg))
            with open_dict(bad):
                OmegaConf.update(bad, key, "not-a-number", force_add=True)
            checked += 1
            try:
                validate_config(bad)
                silent.append(f"{opt.group}={opt.name} {key}")
            except ConfigError as e:
                if key not in str(e) and key.split(".", 1)[1] not in str(e):
                    silent.append(f"{opt.group}={opt.name} {key}: the message does not name it: {e}")
            except Exception as e:  # noqa: BLE001
                crashed.append(f"{opt.group}={opt.name} {key}: {type(e).__name__}: {e}")
    assert checked > 150 and len(alone) <= 1, (checked, alone)  # distill needs a teacher run
    assert not crashed, "\n".join(crashed)
    assert not silent, f"{len(silent)} of {checked} accepted a word:\n" + "\n".join(silent)


def test_config_fuzz_every_numeric_key_of_generate_serve_eval_and_data_is_one_message_before_work(tmp_path):
    """Generated like the training fuzz: each numeric or boolean setting of llmzoo-generate,
    -serve, -eval and -data set to a word is one UserError naming it, before any run is
    loaded or any document read (the data filters' settings included)."""
    from omegaconf import OmegaConf, open_dict

    from llmzoo.cli import _generate
    from llmzoo.errors import UserError
    from llmzoo_plugins.data_pipeline import run_pipeline
    from llmzoo_plugins.evaluation import evaluate
    from llmzoo_plugins.serve import serve

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a document of a few words to filter"}) + "\n")
    missing = f"run_dir={tmp_path / 'no_run'}"
    apps = {"generate": (_generate, [missing]), "serve": (serve, [missing]), "eval": (evaluate, [missing]),
            "data_pipeline": (run_pipeline, [f"input={tmp_path / 'in.jsonl'}", "dedup=minhash",
                                             "filter=[length,gopher_repetition,gopher_quality,c4]"])}
    checked, wrong = 0, []
    for app, (work, overrides) in apps.items():
        base = llmzoo.compose(app, overrides, validate=False)
        for key, _ in _numeric_leaves(base, ""):
            key = key.lstrip(".")
            if key.startswith("hydra"):
                continue
            bad = OmegaConf.create(OmegaConf.to_container(base))
            with open_dict(bad):
                OmegaConf.update(bad, key, "not-a-number", force_add=True)
                if app == "data_pipeline":
                    bad.output = str(tmp_path / f"out_{checked}")
            checked += 1
            try:
                work(bad)
                wrong.append(f"{app} {key}: accepted")
            except UserError as e:
                if key.split(".")[-1] not in str(e):
                    wrong.append(f"{app} {key}: the message does not name it: {e}")
            except Exception as e:  # noqa: BLE001
                wrong.append(f"{app} {key}: {type(e).__name__}: {e}")
    assert checked >= 40 and not wrong, "\n".join(wrong)
    assert not list(tmp_path.glob("out_*/filtered"))  # no document was read


@pytest.mark.parametrize("override,expected", [
    ("model.dim=abc", "model.dim must be a positive integer"),  # llmzoo's ConfigError
    ("block=nope", "Could not find 'block/nope'"),          # Hydra's own message (listing the options): exit 2
])
def test_cli_config_errors_exit_2_without_traceback(tmp_path, override, expected):
    args = ["llmzoo-train", f"run_dir={tmp_path / 'run'}", *FAST, "trainer.max_steps=1", "trainer.val_every=0",
            override]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout and expected in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    if override.startswith("block="):
        assert "dense" in proc.stderr  # the valid options are listed


@pytest.mark.parametrize("overrides,expected", [  # the command prints these ConfigErrors as above
    (["+trainer.logger=wandb"], "trainer.logger is not a known setting"),
    (["decoder=sample", "decoder.top_p=3"], "top_p=3 is not allowed"),
])
def test_config_errors_say_what_is_wrong(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        llmzoo.compose(overrides=overrides)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _bad_data(tmp_path):
    """(name, format or data kind, file) of malformed inputs in every format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok_json = json.dumps({"text": "a fine record " * 20})
    cases = []
    add = lambda name, kind, data, ext: cases.append((name, kind, _write(tmp_path / f"{name}.{ext}", data)))  # noqa: E731
    for n, data in enumerate([b"\xff\xfe bad bytes\n", b"ok line\n\x00\x01 binary\n", b"good\n\xc3\x28\n"]):
        add(f"text{n}", "text", data, "txt")
    for n, line in enumerate(["{not json", "[1, 2]", '{"text": 5}', '{"body": "x"}', '"just a string"', "{}",
                              '{"text": null}', '{"text": "nul \\u0000 inside"}', "\x00\x00", '{"text": "a"']):
        add(f"jsonl{n}", "jsonl", ok_json + "\n" + line + "\n" + ok_json + "\n", "jsonl")
    add("jsonl_utf8", "jsonl", ok_json.encode() + b"\n" + b'{"text": "\xff"}\n', "jsonl")
    for n, table in enumerate([pa.table({"text": [1, 2, 3]}), pa.table({"body": ["x"] * 3}),
                               pa.table({"text": ["a b c " * 30, None, "d e f " * 30]})]):
        path = tmp_path / f"parquet{n}.parquet"
        pq.write_table(table, path)
        cases.append((f"parquet{n}", "parquet", path))
    cases.append(("parquet_broken", "parquet", _write(tmp_path / "broken.parquet", b"PAR1 not really")))
    good_chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    for n, line in enumerate([
        '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
        '{"messages": []}', '{"messages": "hi"}', '{"messages": [{"role": "user", "content": "x"}]}',
        '{"instruction": "x", "input": 5, "output": "y"}', '{"instruction": "", "output": "y"}',
        '{"instruction": "x"}', '{"output": "y"}', "not json", "[]", '{"instruction": "x", "output": 7}',
    ]):
        add(f"chat{n}", "instructions", good_chat + "\n" + line + "\n", "jsonl")
    add("chat_utf8", "instructions", good_chat.encode() + b"\n" + b'{"instruction": "\xff", "output": "y"}\n', "jsonl")
    good_pref = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    for n, line in enumerate(['{"prompt": "p", "chosen": "a"}', '{"prompt": "p", "chosen": 1, "rejected": "b"}',
                              '{"prompt": "", "chosen": "a", "rejected": "b"}', "{oops", '{"chosen": "a", "rejected": "b"}',
                              '{"prompt": "p", "chosen": "a\\u0000", "rejected": "b"}']):
        add(f"pref{n}", "preferences", good_pref + "\n" + line + "\n", "jsonl")
    for n, line in enumerate(['{"answer": "4"}', '{"prompt": 3}', "null"]):
        add(f"prompt{n}", "prompts", json.dumps({"prompt": "2+2="}) + "\n" + line + "\n", "jsonl")
    return cases


def _load(kind, path, skip):
    from llmzoo.data import TextDataModule
    from llmzoo_plugins.chat_data import RecordsDataModule
    from llmzoo_plugins.tokenizers import ByteTokenizer

    if kind in ("text", "jsonl", "parquet"):
        dm = TextDataModule(ByteTokenizer(), path=str(path), format=kind, seq_len=8, batch_size=1,
                            skip_bad_records=skip, work_dir=str(path.parent / f"work_{path.stem}"))
        return dm.load_raw()
    dm = RecordsDataModule(ByteTokenizer(), path=str(path), kind=kind, seq_len=64, batch_size=1,
                           skip_bad_records=skip, work_dir=str(path.parent / f"work_{path.stem}"))
    return dm.records() if hasattr(dm, "records") else dm.load_records()


def test_data_fuzz_every_bad_file_names_file_and_line_or_is_skipped(tmp_path, caplog):
    from llmzoo_plugins.chat_data import read_records

    cases = _bad_data(tmp_path)
    assert len(cases) >= 40
    problems = []
    for name, kind, path in cases:
        try:
            if kind in ("text", "jsonl", "parquet"):
                _load(kind, path, skip=False)
            else:
                read_records([str(path)], kind, skip_bad=False)
            problems.append(f"{name}: passed silently")
        except DataError as e:
            if not (str(path) in str(e) and (f"{path}:" in str(e) or "row " in str(e) or "column" in str(e)
                                             or "parquet file" in str(e))):
                problems.append(f"{name}: message does not name the file and line/row: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {type(e).__name__} instead of a DataError: {e}")
    assert not problems, "\n".join(problems)

    # with skip_bad_records the bad lines are dropped and the good ones kept
    skippable = [c for c in cases if c[0].startswith(("jsonl", "chat", "pref", "text1", "text2", "parquet2"))]
    with caplog.at_level("WARNING"):
        for name, kind, path in skippable:
            if kind in ("text", "jsonl", "parquet"):
                kept = _load(kind, path, skip=True)
                assert len(kept) >= 1, name
            else:
                assert len(read_records([str(path)], kind, skip_bad=True)) >= 1, name
    assert "skipped" in caplog.text or "dropped" in caplog.text


def test_bom_and_line_separator_are_accepted(tmp_path):
    from llmzoo_plugins.chat_data import read_records

    path = _write(tmp_path / "chat.jsonl", b"\xef\xbb\xbf" + json.dumps(
        {"instruction": "say \u2028 this", "output": "ok"}, ensure_ascii=False).encode() + b"\n")
    assert read_records([str(path)], "instructions", skip_bad=False)[0]["instruction"] == "say \u2028 this"
    text = _write(tmp_path / "t.jsonl", b"\xef\xbb\xbf" + (json.dumps({"text": "word " * 40}) + "\n").encode())
    assert len(_load("jsonl", text, skip=False)) == 1


def test_cli_data_errors_exit_2_naming_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = _write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    texts = _write(tmp_path / "t.jsonl", json.dumps({"text": "fine " * 50}) + "\n" + '{"text": 3}\n')
    pq.write_table(pa.table({"text": ["a b c " * 40, None]}), tmp_path / "p.parquet")
    for overrides, expected in [([f"data.path={texts}"], f"{texts}:2: record has no string field 'text'"),
                                (["data=instructions", f"data.path={chat}", "objective=sft"],
                                 f"{chat}:1: messages[0] must be"),
                                ([f"data.path={tmp_path / 'p.parquet'}"], "row 1: 'text' is null")]:
        args = [f"run_dir={tmp_path / 'run'}", *FAST, "trainer.max_steps=1", "overwrite=true", *overrides]
        if "p.parquet" in overrides[0]:  # the command: exit 2, one message, no traceback
            proc = run_cli("llmzoo-train", *args, check=False)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
            assert expected in proc.stderr
        else:  # the same DataError (a UserError: what the command prints) from llmzoo.train
            with pytest.raises(DataError) as e:
                llmzoo.train(llmzoo.compose(overrides=args))
            assert expected in str(e.value)


APP_ERRORS = [  # (app, override, what the message names): checked before the run is even loaded
    ("generate", "max_new_tokens=-1", "max_new_tokens"), ("generate", "max_new_tokens=abc", "max_new_tokens"),
    ("generate", "device=cuda", "CUDA devices"), ("generate", "device=gpu7", "device='gpu7'"),
    ("generate", "chat=maybe", "chat"),
    ("serve", "port=70000", "port"), ("serve", "port=-1", "port"), ("serve", "log_level=loud", "log_level"),
    ("serve", "max_batch=0", "max_batch"), ("serve", "batching=eager", "batching"), ("serve", "device=cuda:3", "CUDA"),
    ("serve", "max_len=0", "max_len"), ("serve", "prefill_batch=abc", "prefill_batch"),
    ("eval", "batch_size=0", "batch_size"), ("eval", "device=tpu", "device='tpu'"),
]


def test_app_settings_fuzz_generate_serve_eval_one_message_before_work(tmp_path):
    from llmzoo.cli import _generate
    from llmzoo_plugins.evaluation import evaluate
    from llmzoo_plugins.serve import serve

    apps = {"generate": _generate, "serve": serve, "eval": evaluate}
    missing = tmp_path / "no_such_run"  # a loaded run would fail differently: the check comes first
    failures = []
    for app, override, named in APP_ERRORS:
        cfg = llmzoo.compose(app, [f"run_dir={missing}", override], validate=False)
        try:
            apps[app](cfg)
            failures.append(f"{app} {override}: accepted")
        except ConfigError as e:
            if named not in str(e):
                failures.append(f"{app} {override}: the message does not name {named!r}: {e}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{app} {override}: {type(e).__name__}: {e}")
    assert not failures, failures
    proc = run_cli("llmzoo-serve", f"run_dir={missing}", "port=70000", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "port=70000" in proc.stderr
