"""Hugging Face folders in and out: models made here with random weights by
``transformers``, saved, imported, compared logit for logit; our runs exported and
loaded back by ``transformers``. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

import llmzoo
from conftest import run_cli
from llmzoo.errors import CheckpointError
from llmzoo_plugins.hf_io import export_hf, from_hf, import_hf
from llmzoo.interfaces import HFUnsupported

transformers = pytest.importorskip("transformers")
VOCAB = 260  # the byte tokenizer (259 ids) written as tokenizer.json, one spare
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (biases and norms included), so a swapped or
    missing tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _byte_tokenizer_folder(folder) -> None:
    """A tokenizer.json + tokenizer_config.json (our byte tokenizer written as HF's)."""
    from llmzoo_plugins.tokenizers import ByteTokenizer

    ByteTokenizer().hf_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "add_bos_token": True, "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}))


def _hf_model(kind: str, tmp_path, **extra):
    dense = {**SMALL, **extra}
    ssm = {"vocab_size": VOCAB, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "expand": 2,
           "conv_kernel": 4, "tie_word_embeddings": False, **extra}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**{"rms_norm_eps": 1e-6, **dense}),
        "mistral": lambda: transformers.MistralConfig(**dense),
        "qwen2": lambda: transformers.Qwen2Config(**{"rms_norm_eps": 1e-6, **dense}),
        "qwen3": lambda: transformers.Qwen3Config(**{"head_dim": 16, "rms_norm_eps": 1e-6, **dense}),
        "mixtral": lambda: transformers.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **dense}),
        "mamba": lambda: transformers.MambaConfig(**ssm),
        "mamba2": lambda: transformers.Mamba2Config(**{"head_dim": 16, "num_heads": 4, "n_groups": 1, "chunk_size": 8,
                                                       **ssm}),
    }
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(configs[kind]()).float().eval()
    _randomise(hf)
    folder = tmp_path / f"hf_{kind}"
    hf.save_pretrained(folder)
    _byte_tokenizer_folder(folder)
    return hf, folder


IDS = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))


def _same_logits(ours, hf, ids=IDS, atol=1e-4):
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


FAMILIES = [("llama", {}), ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
            ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "head_dim": 16, "attention_bias": True}),
            ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
            ("llama", {"tie_word_embeddings": True}),
            ("mistral", {"sliding_window": 7}), ("qwen2", {}), ("qwen3", {}), ("mixtral", {}),
            ("mamba", {}), ("mamba2", {})]


@pytest.mark.parametrize("kind,extra", FAMILIES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FAMILIES)])
def test_import_gives_the_logits_of_transformers(kind, extra, tmp_path):
    hf, folder = _hf_model(kind, tmp_path, **extra)
    run = from_hf(folder)
    _same_logits(run.model, hf)
    if kind == "mistral":  # the window matters: longer than it, and cached decoding keeps it
        assert run.model.blocks[0].mixer.sliding_window == 7
    if kind == "qwen2":
        assert run.model.blocks[0].mixer.q.bias.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "mistral", "mamba2"])
def test_greedy_decoding_of_an_import_equals_transformers_generate(kind, tmp_path):
    hf, folder = _hf_model(kind, tmp_path, **({"sliding_window": 5} if kind == "mistral" else {}))
    run = from_hf(folder)
    prompt = [5, 17, 42, 8]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()
    got = llmzoo.api.generate_ids(run, llmzoo.build_decoder(run.cfg), [prompt], max_new_tokens=12)[0]
    assert got == want


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mamba"])
def test_a_tied_embedding_model_imports_loads_generates_and_exports_with_transformers_logits(kind, tmp_path):
    """tie_word_embeddings=true (HF Mamba's default): the tie survives the meta-device build,
    so the imported folder loads (it was refused), decodes as transformers does and exports."""
    hf, folder = _hf_model(kind, tmp_path, tie_word_embeddings=True)
    run = llmzoo.load_run(import_hf(folder, tmp_path / "imported"))
    assert run.model.head.weight is run.model.embedding.weight
    _same_logits(run.model, hf)
    prompt = [5, 17, 42, 8]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert llmzoo.api.generate_ids(run, llmzoo.build_decoder(run.cfg), [prompt], max_new_tokens=8)[0] == want
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "exported")).float().eval()
    _same_logits(run.model, back)


def test_a_load_error_shows_every_key_at_fault(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _hf_model("llama", tmp_path)
    run_dir = import_hf(folder, tmp_path / "imported")
    weights = load_file(run_dir / "model.safetensors")
    weights["blocks.0.extra.weight"] = torch.zeros(1)
    del weights["norm.weight"]
    save_file(weights, run_dir / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        llmzoo.load_run(run_dir)
    assert "blocks.0.extra.weight" in str(e.value) and "norm.weight" in str(e.value) and "\n" not in str(e.value)


def test_import_reads_sharded_checkpoints_and_the_tokenizer(tmp_path):
    hf, folder = _hf_model("llama", tmp_path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    _byte_tokenizer_folder(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    run = from_hf(sharded)
    _same_logits(run.model, hf)
    tok = run.tokenizer
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.eos_id == 257 and tok.add_bos
    assert llmzoo.api.prompt_ids(tok, ["hi"]) == [[tok.bos_id, 104, 105]]  # add_bos_token=true
    pieces = tok.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert pieces == [("[user]q</s>", False), ("[assistant]", False), ("a</s>", True)]


def test_unsupported_fields_are_refused_naming_the_field(tmp_path):
    _, folder = _hf_model("llama", tmp_path, hidden_act="gelu")
    with pytest.raises(HFUnsupported, match="hidden_act='gelu'"):
        from_hf(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(HFUnsupported, match="model_type='gpt2'.*known: llama"):
        from_hf(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with pytest.raises(CheckpointError, match="pickle files can run code"):
        from_hf(folder)


def test_import_then_fine_tune_then_load_run(tmp_path):
    _, folder = _hf_model("qwen2", tmp_path)
    run_dir = import_hf(folder, tmp_path / "imported")
    run = llmzoo.load_run(run_dir)
    assert run.model.blocks[0].mixer.q.bias is not None
    cfg = llmzoo.compose(overrides=[f"init_from=hf:{folder}", f"run_dir={tmp_path / 'ft'}", "trainer.max_steps=3",
                                    "data.seq_len=32", "data.batch_size=2", "sample.prompts=[]",
                                    "trainer.val_every=0", "trainer.enable_progress_bar=false", "logger=[]"])
    summary = llmzoo.train(cfg)
    assert summary["step"] == 3
    tuned = llmzoo.load_run(tmp_path / "ft")
    assert tuned.cfg.block.qkv_bias and tuned.model.vocab_size == VOCAB
    before = run.model.blocks[0].mixer.q.weight
    assert not torch.equal(tuned.model.blocks[0].mixer.q.weight, before)  # it trained


# ----------------------------------------------------------------------------- export
def _our_run(tmp_path, *overrides):
    cfg = llmzoo.compose(overrides=["model=tiny", "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}",
                                    "data.seq_len=32", "data.batch_size=2", "sample.prompts=[]",
                                    "trainer.val_every=0", "trainer.enable_progress_bar=false", "logger=[]", *overrides])
    llmzoo.train(cfg)
    run = llmzoo.load_run(tmp_path / "run")
    _randomise(run.model, seed=3)
    return run


EXPORTS = {"dense": [], "qwen3": ["block.qk_norm=true", "block.head_dim=32"],
           "moe": ["block=moe", "block.n_experts=4"],
           "mamba": ["block=mamba", "block.mlp=false"], "mamba2": ["block=mamba2", "block.mlp=false",
                                                                  "block.chunk_size=8"]}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits_and_ids(name, tmp_path):
    run = _our_run(tmp_path, *EXPORTS[name])
    out = export_hf(run, tmp_path / "exported")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(2))
    _same_logits(run.model, hf, ids)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, ünïcode — 17 + 25 ="
    assert hf_tok(text)["input_ids"] == run.tokenizer.encode(text)
    assert hf_tok.decode(run.tokenizer.encode(text)) == text
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == hf_tok.bos_token + \
        "".join(t for t, _ in run.tokenizer.render_chat(chat, generation_prompt=True))
    # token for token, <bos> included: what llmzoo's SFT rows and chat prompts start with
    ids = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == llmzoo.api.prompt_ids(run.tokenizer, ["hi"], chat=True)[0] and ids[0] == run.tokenizer.bos_id
    # and back: import(export(run)) is the same model
    again = from_hf(out)
    assert again.model.state_dict().keys() == run.model.state_dict().keys()
    for k, v in run.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k


def test_export_refuses_blocks_without_a_transformers_family(tmp_path):
    run = _our_run(tmp_path, "block=mamba")  # Mamba with an MLP
    with pytest.raises(HFUnsupported, match="block.mlp=true"):
        export_hf(run, tmp_path / "out")


def test_cli_import_and_export(tmp_path, capsys):
    from llmzoo.cli import main

    _, folder = _hf_model("llama", tmp_path)
    assert main(["import-hf", str(folder), f"run_dir={tmp_path / 'imp'}"]) == 0
    assert main(["export-hf", f"run_dir={tmp_path / 'imp'}", f"out={tmp_path / 'exp'}"]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["model_type"] == "llama"
    for bad, said in ((["import-hf", str(tmp_path / "nothing"), f"run_dir={tmp_path / 'x'}"], "no config.json"),
                      (["import-hf", str(folder)], "missing run_dir="),
                      (["export-hf", f"run_dir={tmp_path / 'imp'}", "out=o", "colour=red"], "key one of")):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("template,why", [
    ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "budget"),
    ("{{ 'x' * 100000000 }}", "too long"),
])
def test_a_bad_chat_template_is_refused_at_import_and_at_load(template, why, tmp_path):
    from llmzoo.interfaces import HFUnsupported

    _, folder = _hf_model("llama", tmp_path)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": template}))
    with pytest.raises(HFUnsupported, match=f"the chat template is refused: .*{why}"):
        from_hf(folder)
    if why == "budget":  # the command once: one message, exit 2
        proc = run_cli("llmzoo", "import-hf", str(folder), f"run_dir={tmp_path / 'run'}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and why in proc.stderr
    # a run folder whose stored tokenizer carries it (written by hand) is refused at load too
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    import_hf(folder, tmp_path / "ok")
    meta = tmp_path / "ok" / "tokenizer" / "llmzoo_tokenizer.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "chat_template": template}))
    with pytest.raises(CheckpointError, match=f"the tokenizer cannot be loaded: .*{why}"):
        llmzoo.load_run(tmp_path / "ok")
