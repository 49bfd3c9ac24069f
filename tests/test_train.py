"""Training end to end: the loss falls, checkpoints resume exactly, runs reload."""

import math
import shutil

import lightning as L
import pytest
import torch
from omegaconf import open_dict

import llmzoo
from llmzoo.errors import UserError
from llmzoo.plugins import get_plugin_manager
from conftest import FAST, run_cli, tiny_cfg, train_run


def cfg_for(run_dir, *overrides):
    cfg = tiny_cfg(*[o for o in FAST if not o.startswith("trainer.")], *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        cfg.logger = {}
    return cfg


def read_metrics(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_tiny_model_learns_the_bundled_corpus(tmp_path):
    cfg = cfg_for(tmp_path, "trainer.max_steps=200", "trainer.val_every=100")
    summary = llmzoo.train(cfg)
    val = [float(r["val_loss"]) for r in read_metrics(tmp_path) if r.get("val_loss")]
    chance = math.log(259)  # an untrained model is close to uniform over the byte vocabulary
    assert len(val) == 2 and val[1] < val[0] < chance
    assert val[1] < 0.35 * chance, f"val loss {val} did not fall far below {chance:.2f}"
    assert summary["step"] == 200
    for f in ("config.yaml", "metrics.csv", "model.safetensors", "tokenizer", "checkpoints/last.ckpt",
              "checkpoints/best.ckpt"):
        assert (tmp_path / f).exists(), f


class CrashAt:
    """A plugin whose callback kills training at a given step."""

    def __init__(self, step):
        self.step = step

    @llmzoo.hookimpl
    def llmzoo_callbacks(self, cfg):
        step = self.step

        class Crash(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == step:
                    raise RuntimeError("simulated crash")

        return [Crash()]


def test_crash_then_resume_equals_uninterrupted_run(tmp_path):
    overrides = ["trainer.max_steps=16", "trainer.val_every=0", "trainer.checkpoint_every=100", "optim.warmup_steps=4",
                 "trainer.log_every_n_steps=1"]
    llmzoo.train(cfg_for(tmp_path / "straight", *overrides))

    pm = get_plugin_manager()
    plugin = CrashAt(9)
    pm.register(plugin, name="crash-test")
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            llmzoo.train(cfg_for(tmp_path / "crashed", *overrides))
    finally:
        pm.unregister(plugin)
    ckpt = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 9

    resumed = cfg_for(tmp_path / "crashed", *overrides, f"ckpt_path={ckpt}")
    assert llmzoo.train(resumed)["step"] == 16

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["global_step"] == b["global_step"] == 16
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=f"weights differ at {k}")
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        assert float(sa[i]["step"]) == float(sb[i]["step"]) == 16
        torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    # metrics.csv: the crash came after step 8's checkpoint but before Lightning logged step 8's
    # row; the row travelled in the checkpoint, so the resumed file has every row once
    rows = [[(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / d) if r["train_loss"]]
            for d in ("straight", "crashed")]
    assert rows[1] == rows[0] and [int(s) for s, _ in rows[0]] == list(range(16))


def test_checkpoint_alone_rebuilds_the_run_and_generate_cli(tmp_path):
    run = tmp_path / "run"
    llmzoo.train(cfg_for(run, "trainer.max_steps=30", "trainer.val_every=0", "tokenizer=bpe",
                         "tokenizer.vocab_size=300"))
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    from_ckpt = llmzoo.load_checkpoint(lone)
    from_run = llmzoo.load_run(run)
    assert from_ckpt.tokenizer.encode("the fox") == from_run.tokenizer.encode("the fox")
    ids = torch.tensor([from_run.tokenizer.encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.model(ids).logits, from_run.model(ids).logits)

    out = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=Once upon", "max_new_tokens=12")
    expected = from_run.tokenizer.decode(llmzoo.build_decoder(from_run.cfg).generate(
        from_run.model, [from_run.tokenizer.encode("Once upon")], max_new_tokens=12)[0])
    assert out.stdout.strip().startswith("Once upon" + expected.rstrip())
    assert "tokens/s" in out.stderr
    with pytest.raises(UserError, match="use max_new_tokens <="):  # what the command prints, exit 2
        llmzoo.generate(from_run, None, ["Once upon"], max_new_tokens=500)


@pytest.mark.parametrize("experiment", [o.name for o in llmzoo.list_options() if o.group == "experiment"])
def test_every_experiment_runs_a_step(tmp_path, experiment):
    quiet = ["trainer.max_steps=2", "trainer.val_every=0", "sample.prompts=[]", "trainer.enable_progress_bar=false",
             "logger=[]"]
    cfg = llmzoo.compose(overrides=[f"experiment={experiment}", *quiet, f"run_dir={tmp_path / 'run'}"])
    if cfg.get("init_from"):  # a later stage of a chain: give it a (2-step) earlier stage to start from
        llmzoo.train(llmzoo.compose(overrides=[*quiet, f"run_dir={tmp_path / 'before'}"]))
        with open_dict(cfg):
            cfg.init_from = str(tmp_path / "before")
    if cfg.objective.get("reward_model"):  # PPO against a learned reward: give it a (2-step) one
        llmzoo.train(llmzoo.compose(overrides=[*quiet, "objective=reward", "data=preferences",
                                               f"init_from={tmp_path / 'before'}", f"run_dir={tmp_path / 'rm'}"]))
        with open_dict(cfg):
            cfg.objective.reward_model = str(tmp_path / "rm")
    assert llmzoo.train(cfg)["step"] == 2


def test_compiled_blocks_train_like_eager(tmp_path):
    """trainer.compile=true: the same losses as eager (fp32) and loadable checkpoints."""
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compile_{compiled}"
        llmzoo.train(cfg_for(run, "trainer.max_steps=4", "trainer.val_every=0", "trainer.log_every_n_steps=1",
                             "data.batch_size=4", "model.n_layers=1", f"trainer.compile={str(compiled).lower()}"))
        losses[compiled] = [float(r["train_loss"]) for r in read_metrics(run) if r.get("train_loss")]
    assert len(losses[True]) == 4
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) < 1e-4, losses
    llmzoo.load_run(tmp_path / "compile_True")  # parameter names are unchanged by compiling


def test_wandb_offline_and_mlflow_local_receive_metrics_and_the_config(tmp_path, monkeypatch):
    """logger=[tensorboard,wandb,mlflow]: each gets the training loss and the resolved config."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    cfg = tiny_cfg("logger=[tensorboard,wandb,mlflow]", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                   "trainer.val_every=0", "trainer.enable_progress_bar=false", "sample.prompts=[]",
                   f"run_dir={tmp_path}", "optim.lr=0.0123")
    llmzoo.train(cfg)
    # MLflow: a run in <run_dir>/mlflow.db with train_loss at each of the 4 steps and the config as params
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "llmzoo"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["optim/lr"] == "0.0123" and run.data.params["block/_target_"].endswith("DenseBlock")
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) == 4 and all(math.isfinite(m.value) for m in losses)
    # wandb offline: the run's record file (protobuf records, synced later by `wandb sync`)
    # holds the config and one history row per step
    (record,) = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    data = record.read_bytes()
    assert b"optim/lr" in data and b"0.0123" in data and b"DenseBlock" in data
    assert data.count(b"train_loss") >= 4
    # TensorBoard: the config in the HParams tab (its experiment and session records), linked to the losses
    events = b"".join(f.read_bytes() for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert b"_hparams_/experiment" in events and b"_hparams_/session_start_info" in events
    assert b"optim/lr" in events and b"val_loss" in events


def test_a_logger_whose_library_is_missing_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_cfg("logger=[wandb]", "trainer.max_steps=1", f"run_dir={tmp_path}", "sample.prompts=[]")
    with pytest.raises(UserError, match="logger.wandb .* cannot start"):
        llmzoo.train(cfg)


def test_training_a_finished_run_further_continues_its_data_order(tmp_path):
    """3 steps, then resumed to 6, equals 6 steps at once (constant learning rate): the
    resumed run goes on with the epoch the first one was in, though Lightning counted it done."""
    common = ["trainer.val_every=0", "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "optim.min_lr_ratio=1.0",
              "data.seq_len=32", "data.batch_size=4"]
    llmzoo.train(cfg_for(tmp_path / "straight", *common, "trainer.max_steps=6"))
    llmzoo.train(cfg_for(tmp_path / "more", *common, "trainer.max_steps=3"))
    llmzoo.train(cfg_for(tmp_path / "more", *common, "trainer.max_steps=6",
                         f"ckpt_path={tmp_path / 'more' / 'checkpoints' / 'last.ckpt'}"))
    rows = [[(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / d) if r["train_loss"]]
            for d in ("straight", "more")]
    assert rows[1] == rows[0] and len(rows[0]) == 6


def test_init_from_a_run_of_another_block_is_one_message_exit_2(tmp_path):
    """A starting run whose weights do not fit the configured block: one line naming the
    parameters that differ, exit 2, no traceback."""
    from conftest import FAST, run_cli

    first = tmp_path / "dense"
    train_run(f"run_dir={first}", *FAST, "model=tiny", "trainer.max_steps=1", "trainer.val_every=0")
    out = run_cli("llmzoo-train", "block=mamba", f"init_from={first}", f"run_dir={tmp_path / 'mamba'}", *FAST,
                  "model=tiny", "trainer.max_steps=1", "trainer.val_every=0", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"init_from={first}: its model does not fit this config" in out.stderr and "missing:" in out.stderr
    assert "Traceback" not in out.stderr


def test_ready_model_parallelizes_the_plain_blocks_then_compiles_them():
    """The one documented order (llmzoo.training.ready_model): the strategy sees blocks
    that are not compiled yet; the blocks it returns are then compiled in place, so
    parameter names (and so checkpoints) are those of the plain model."""
    from llmzoo.training import ready_model

    model = llmzoo.build_model(tiny_cfg())
    names = [n for n, _ in model.named_parameters()]
    seen = []

    class Recording:
        requires = frozenset()

        def lightning_strategy(self):
            return "auto"

        def parallelize(self, m, mesh):
            seen.append([getattr(b, "_compiled_call_impl", None) is None for b in m.blocks])
            return m

    out = ready_model(model, Recording(), None, compile=True)
    assert seen == [[True] * len(model.blocks)]
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in out.blocks)
    assert [n for n, _ in out.named_parameters()] == names
    plain = ready_model(llmzoo.build_model(tiny_cfg()), Recording(), None, compile=False)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in plain.blocks)


def test_init_from_a_bpe_run_records_its_tokenizer_and_generates_what_the_parent_does(tmp_path):
    """A later stage started from a run with another tokenizer trains with -- and records --
    the tokenizer of that run, not the configured default, so loading it decodes right."""
    parent, child = tmp_path / "bpe", tmp_path / "child"
    llmzoo.train(cfg_for(parent, "trainer.max_steps=30", "trainer.val_every=0", "tokenizer=bpe",
                         "tokenizer.vocab_size=300"))
    # one step at a negligible learning rate: the child's weights are the parent's
    llmzoo.train(cfg_for(child, f"init_from={parent}", "trainer.max_steps=1", "trainer.val_every=0", "optim.lr=1e-12"))
    a, b = llmzoo.load_run(parent), llmzoo.load_run(child)
    assert b.cfg.tokenizer._target_ == a.cfg.tokenizer._target_ == "llmzoo_plugins.tokenizers.BPETokenizer"
    assert type(b.tokenizer) is type(a.tokenizer) and b.tokenizer.vocab_size == a.tokenizer.vocab_size == 300
    assert b.tokenizer.encode("the little fox") == a.tokenizer.encode("the little fox")
    prompt = ["Once upon a time"]
    assert llmzoo.generate(b, None, prompt, max_new_tokens=16) == llmzoo.generate(a, None, prompt, max_new_tokens=16)
    # and it resumes: the recorded tokenizer is not a change to refuse
    llmzoo.train(cfg_for(child, f"init_from={parent}", "trainer.max_steps=2", "trainer.val_every=0", "optim.lr=1e-12",
                         f"ckpt_path={child / 'checkpoints' / 'last.ckpt'}", "overwrite=true"))


def test_a_prompt_is_taken_as_typed_after_dashes_from_a_file_or_from_stdin(tmp_path, monkeypatch):
    """`llmzoo-generate run_dir=... -- 12 + 7 =`, `echo "12 + 7 =" | llmzoo-generate ...`,
    prompt_file= and prompt=12 + 7 = (no Hydra quoting) all generate what the quoted form does."""
    import subprocess

    from omegaconf import OmegaConf

    from conftest import BIN
    from llmzoo.shared.prompts import prompts_from, typed_prompt

    run = tmp_path / "run"
    train_run(f"run_dir={run}", *FAST, "trainer.max_steps=20", "trainer.val_every=0")
    text = "12 + 7 ="
    loaded = llmzoo.load_run(run)
    want = text + llmzoo.generate(loaded, None, [text], max_new_tokens=8)[0]
    # the command reads the piped prompt; `-- 12 + 7 =` and prompt= are parsed into the same text
    piped = subprocess.run([str(BIN / "llmzoo-generate"), f"run_dir={run}", "max_new_tokens=8"], input=text + "\n",
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout.strip() == want.strip()
    assert typed_prompt([f"run_dir={run}", "max_new_tokens=8", "--", "12", "+", "7", "="]) == (
        [f"run_dir={run}", "max_new_tokens=8"], text)
    for typed in (f"prompt={text}", f"prompt='{text}'"):  # as typed, or with Hydra's quotes
        assert typed_prompt([f"run_dir={run}", typed, "max_new_tokens=8"]) == ([f"run_dir={run}", "max_new_tokens=8"], text)

    # what generate_main keeps of the command line (cli._TYPED_PROMPT) wins over the config's prompts
    assert prompts_from(OmegaConf.create({"prompt_file": None, "prompts": ["other"], "prompt": "x"}), text) == [text]
    (tmp_path / "p.txt").write_text(text + "\n")
    assert prompts_from(OmegaConf.create({"prompt_file": str(tmp_path / "p.txt"), "prompts": None, "prompt": "x"}),
                        None) == [text]
    with pytest.raises(UserError, match="prompt_file=.*no such file"):
        prompts_from(OmegaConf.create({"prompt_file": str(tmp_path / "nope.txt"), "prompts": None, "prompt": "x"}), None)
