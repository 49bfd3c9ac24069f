"""Every config option composes and instantiates; bad configs fail early and clearly."""

import pytest
import torch
from omegaconf import open_dict

import llmzoo
from llmzoo.config import ConfigError
from conftest import FAST, run_cli, train_run

# experiment and hparams_search files are global (no node of their own): see test_train.py and test_bench.py
OPTIONS = [(o.group, o.name) for o in llmzoo.list_options() if o.group not in ("experiment", "hparams_search")]


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert {"tokenizer", "model", "block", "objective", "decoder", "parallel", "data", "trainer"} <= groups


@pytest.mark.parametrize("group,name", OPTIONS)
def test_option_composes_and_instantiates(group, name, tmp_path):
    if group == "eval_task":  # a group of llmzoo-eval's config: the task's file must parse
        from omegaconf import OmegaConf

        from llmzoo_plugins.evaluation import Task

        node = llmzoo.compose("eval", [f"eval_task=[{name}]"], validate=False).eval_task[name]
        spec = OmegaConf.to_container(node, resolve=True)
        assert len(Task(**{**spec, "until": tuple(spec.get("until", ()))}).rows()) >= 20
        return
    if group in ("filter", "dedup", "executor", "select"):  # groups of llmzoo-data's config
        pytest.importorskip("datatrove")
        from hydra.utils import instantiate

        needs = {"perplexity": ["select.run_dir=runs/x"], "dsir": ["select.target=t.jsonl"]}.get(name, [])
        cfg = llmzoo.compose("data_pipeline", [f"{group}=[{name}]" if group == "filter" else f"{group}={name}",
                                               *(needs if group == "select" else [])], validate=False)
        if group == "filter" and name != "bad_words":  # bad_words needs a word list (filter.bad_words.path)
            assert instantiate(cfg.filter[name]).filter is not None
        elif group == "executor" and name == "local":
            assert instantiate(cfg.executor, pipeline=[], logging_dir=str(tmp_path)).tasks == 1
        elif group == "select":  # a selector: scores(texts), and how many to keep
            sel = instantiate(cfg.select)
            assert callable(sel.scores) and (sel.target_docs, sel.fraction) == (None, 0.5)
        elif group == "dedup":  # settings checked before any work; a kind the pipeline runs
            from llmzoo_plugins.data_pipeline import DEDUP_KINDS, check_pipeline_config

            check_pipeline_config(cfg)
            assert cfg.dedup.kind in DEDUP_KINDS
        else:  # slurm and ray: the executor's factory resolves (its library is imported when used)
            from llmzoo.config import target_class

            assert callable(target_class(cfg.executor._target_))
        return
    if group == "logger":  # each logger starts in the run folder and takes the config
        from llmzoo.training import build_loggers

        (logger,) = build_loggers(llmzoo.compose(overrides=[f"logger=[{name}]"]), tmp_path)
        getattr(logger.experiment, "finish", lambda: None)()  # wandb: end its offline run
        assert any(tmp_path.iterdir())
        return
    # quantize is a group of llmzoo-generate's config only (a model transform for decoding)
    overrides = [f"+{group}={name}" if group == "quantize" else f"{group}={name}"]
    if (group, name) in (("objective", "grpo"), ("objective", "ppo"), ("objective", "rloo"), ("data", "prompts")):
        overrides += ["data=prompts", "reward=keyword"] + (["objective=grpo"] if group == "data" else [])  # RL
    if (group, name) == ("objective", "distill"):  # a teacher run to learn from: the tiny model, saved
        teacher = tmp_path / "teacher"
        train_run("model=tiny", f"run_dir={teacher}", "trainer.max_steps=1", "trainer.val_every=0", *FAST)
        overrides += ["data=prompts", f"objective.teacher={teacher}"]
    if (group, name) in (("objective", "dpo"), ("objective", "reward"), ("objective", "kto"), ("objective", "orpo"),
                         ("objective", "simpo"), ("data", "preferences")):  # preference pairs
        overrides += ["data=preferences"] + (["objective=dpo"] if group == "data" else [])
    if (group, name) in (("decoder", "medusa"), ("decoder", "eagle")):  # decode with the heads objective=... trains
        overrides.append(f"objective={name}")
    if (group, name) == ("parallel", "fsdp_tp"):  # a (2, 2) mesh: four processes
        overrides.append("trainer.devices=4")
    if (group, name) == ("tokenizer", "file"):
        from llmzoo_plugins.tokenizers import BPETokenizer

        tok = BPETokenizer(vocab_size=300)
        tok.fit(["the fox and the owl"] * 20)
        tok.save(tmp_path)
        overrides.append(f"tokenizer.path={tmp_path}")
    cfg = llmzoo.compose(overrides=overrides)
    # the option chosen is the one composed: its file's _target_ (where it names one) is the node's
    from llmzoo.config import conf_docs

    (doc,) = [d.doc for d in conf_docs() if d.group == group and d.name == name]
    if "_target_" in doc:
        assert cfg[group]._target_ == doc["_target_"]
    tokenizer = llmzoo.build_tokenizer(cfg)
    assert tokenizer.vocab_size > 0
    if group == "model" and cfg.model.dim > 128:  # GPU-sized presets: build on the meta device
        with torch.device("meta"):
            model = llmzoo.build_model(cfg)
        expected = {"small": (9e6, 12e6), "125m": (100e6, 150e6), "1b": (0.9e9, 1.2e9)}[name]
        assert expected[0] < model.num_parameters() < expected[1], model.num_parameters()
    else:
        model = llmzoo.build_model(cfg)
        ids = torch.randint(0, tokenizer.vocab_size, (1, 8))
        assert model(ids).logits.shape == (1, 8, model.vocab_size)
    if group == "model" and name == "tiny":
        assert model.num_parameters() < 1e6
    llmzoo.build_objective(cfg, model, tokenizer)
    llmzoo.build_decoder(cfg)
    if group == "quantize":
        import copy

        from hydra.utils import instantiate

        quantized = instantiate(cfg.quantize)(copy.deepcopy(model))
        ref, got = model(ids).logits, quantized(ids).logits
        assert 0 < (got - ref).abs().max() < 0.25 * ref.abs().max()  # random weights: a smoke test
    strategy = llmzoo.build_strategy(cfg)
    assert strategy.lightning_strategy() is not None


def test_heads_not_dividing_dim_is_one_clear_message():
    with pytest.raises(ConfigError) as e:
        llmzoo.compose(overrides=["model=tiny", "model.n_heads=5"])
    msg = str(e.value)
    assert "block: n_heads=5 does not divide dim=64" in msg and "allowed n_heads: [1, 2, 4, 8" in msg
    with pytest.raises(ConfigError, match=r"block: n_kv_heads=3 must divide n_heads=4 \(allowed: \[1, 2, 4\]\)"):
        llmzoo.compose(overrides=["model=tiny", "model.n_kv_heads=3"])


def test_other_validation_messages():
    with pytest.raises(ConfigError, match="data.seq_len=256 is longer than model.max_seq_len=128"):
        llmzoo.compose(overrides=["model=tiny", "data.seq_len=256"])
    with pytest.raises(ConfigError, match="block: backend='cuda' is not one of"):
        llmzoo.compose(overrides=["block.backend=cuda"])
    with pytest.raises(ConfigError, match="parallel=single runs one process"):
        llmzoo.compose(overrides=["trainer.devices=2"])


def test_decoder_requirements_checked_against_block_capabilities():
    cfg = llmzoo.compose(overrides=["model=tiny", "block=mamba"])
    from llmzoo.config import core_problems

    class NeedsTree:
        requires = frozenset({"tree_mask", "stateful"})

    import sys
    import types

    mod = types.ModuleType("fake_decoders")
    mod.NeedsTree = NeedsTree
    sys.modules["fake_decoders"] = mod
    try:
        with open_dict(cfg):
            cfg.decoder = {"_target_": "fake_decoders.NeedsTree"}
        problems = core_problems(cfg)
    finally:
        del sys.modules["fake_decoders"]
    assert any("lacks ['tree_mask']" in p and "block=" in p for p in problems), problems


def test_a_bad_shape_is_refused_before_training():
    # the command prints this ConfigError and exits 2 (tests/test_safety.py runs it for model.dim=abc)
    with pytest.raises(ConfigError, match=r"block: n_heads=3 does not divide dim=64"):
        llmzoo.compose(overrides=["model.n_heads=3"])


def test_help_lists_groups(capsys):
    out = run_cli("llmzoo-train", "--help")
    for group in ("block: dense", "model: 125m, 1b, small, tiny", "decoder: beam, eagle, greedy, medusa, sample, speculative, static"):
        assert group in out.stdout
    from llmzoo.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's --help, in this process
        main(["--help"])
    assert e.value.code == 0 and "plugins" in capsys.readouterr().out
