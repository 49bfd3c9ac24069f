"""LoRA through peft: only the adapters train, the run reloads and resumes, the adapter is
saved in peft's format, and merging gives the same logits."""

from __future__ import annotations

import pytest
import torch

import llmzoo
from llmzoo.plugins import get_plugin_manager
from test_train import CrashAt

peft = pytest.importorskip("peft")
QUIET = ["trainer.val_every=0", "trainer.enable_progress_bar=false", "logger=[]", "sample.prompts=[]",
         "data.seq_len=32", "data.batch_size=4"]
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    llmzoo.train(llmzoo.compose(overrides=["model=tiny", f"run_dir={out}", "trainer.max_steps=3", *QUIET]))
    return out


def _crash_then_resume(overrides, run_dir, step):
    """Train until a crash at ``step`` (the checkpoint is written on the way out), then resume."""
    pm = get_plugin_manager()
    crash = CrashAt(step)
    pm.register(crash, name="crash-peft")
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            llmzoo.train(llmzoo.compose(overrides=[*overrides, f"run_dir={run_dir}"]))
    finally:
        pm.unregister(crash)
    llmzoo.train(llmzoo.compose(overrides=[*overrides, f"run_dir={run_dir}",
                                           f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("block", ["dense", "mamba2", "moe"])
def test_lora_trains_only_adapters_reloads_resumes_and_merges(base, tmp_path, block):
    if block != "dense":  # a base run of this block first (MoE: the experts get adapters too)
        base = tmp_path / "base"
        llmzoo.train(llmzoo.compose(overrides=["model=tiny", f"block={block}", f"run_dir={base}",
                                               "trainer.max_steps=3", *QUIET]))
    start = llmzoo.load_run(base)
    over = ["model=tiny", f"block={block}", "peft=lora", "peft.r=4", f"init_from={base}", "optim.lr=0.01",
            "trainer.max_steps=6", *QUIET]
    llmzoo.train(llmzoo.compose(overrides=[*over, f"run_dir={tmp_path / 'lora'}"]))
    run = llmzoo.load_run(tmp_path / "lora")
    state = run.model.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    # the base weights are exactly the starting run's; the adapters moved
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert frozen.keys() == start.model.state_dict().keys()
    for k, v in start.model.state_dict().items():
        assert torch.equal(frozen[k], v), k
    assert any(state[k].abs().sum() > 0 for k in lora if ".lora_B." in k)
    assert not torch.allclose(_logits(run.model), _logits(start.model))
    # peft's own loader reads the saved adapter into a fresh copy of the base: same logits
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    fresh = llmzoo.load_run(base).model
    import json

    conf = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    fresh = inject_adapter_in_model(LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"],
                                               target_modules=conf["target_modules"],
                                               target_parameters=conf.get("target_parameters")), fresh)
    set_peft_model_state_dict(fresh, load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    torch.testing.assert_close(_logits(fresh), _logits(run.model), atol=1e-5, rtol=1e-5)
    # a crash at step 3 (its checkpoint is written on the way out), then resume: the same adapters
    _crash_then_resume(over, tmp_path / "half", step=3)
    resumed = llmzoo.load_run(tmp_path / "half").model.state_dict()
    for k in lora:
        torch.testing.assert_close(resumed[k], state[k], atol=1e-6, rtol=1e-5)
    # merging folds B A into the weights: plain layers, the same logits
    from llmzoo_plugins.peft_adapters import LoRA

    before = _logits(run.model)
    merged = LoRA.merge(run.model)
    assert not [k for k in merged.state_dict() if "lora_" in k or "base_layer" in k]
    torch.testing.assert_close(_logits(merged), before, atol=1e-5, rtol=1e-5)


def test_merge_adapter_cli_and_export_of_a_lora_run(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmzoo.cli import main
    from llmzoo_plugins.hf_io import export_hf

    llmzoo.train(llmzoo.compose(overrides=["model=tiny", "peft=lora", f"init_from={base}", "optim.lr=0.01",
                                           f"run_dir={tmp_path / 'lora'}", "trainer.max_steps=3", *QUIET]))
    run = llmzoo.load_run(tmp_path / "lora")
    assert main(["merge-adapter", f"run_dir={tmp_path / 'lora'}", f"out={tmp_path / 'merged'}"]) == 0
    merged = llmzoo.load_run(tmp_path / "merged")
    assert merged.cfg.get("peft") is None and not [k for k in merged.model.state_dict() if "lora_" in k]
    torch.testing.assert_close(_logits(merged.model), _logits(run.model), atol=1e-5, rtol=1e-5)
    out = export_hf(run, tmp_path / "hf")  # exports merge
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, _logits(run.model), atol=1e-4, rtol=1e-4)


def test_qlora_trains_adapters_over_4bit_weights_reloads_resumes_and_merges(base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmzoo_plugins.peft_adapters import QLoRA, _dequantize

    over = ["model=tiny", "peft=qlora", "peft.r=4", f"init_from={base}", "optim.lr=0.01", "trainer.max_steps=4",
            *QUIET]
    llmzoo.train(llmzoo.compose(overrides=[*over, f"run_dir={tmp_path / 'q'}"]))
    run = llmzoo.load_run(tmp_path / "q")
    q = run.model.blocks[0].mixer.q
    assert type(q.base_layer).__name__ == "Linear4bit" and q.base_layer.weight.dtype == torch.uint8
    # the frozen base is the starting weight in 4 bits: the same codes as quantizing it afresh
    start = llmzoo.load_run(base).model
    fresh = QLoRA(r=4).quantized(start.blocks[0].mixer.q)
    assert torch.equal(q.base_layer.weight.data, fresh.weight.data)
    assert torch.equal(_dequantize(q.base_layer), _dequantize(fresh))
    assert q.lora_B.default.weight.abs().sum() > 0
    # reload twice: the same model; a crash at step 2 and resume: the same adapters
    again = llmzoo.load_run(tmp_path / "q")
    torch.testing.assert_close(_logits(again.model), _logits(run.model), atol=0, rtol=0)
    _crash_then_resume(over, tmp_path / "half", step=2)
    torch.testing.assert_close(_logits(llmzoo.load_run(tmp_path / "half").model), _logits(run.model),
                               atol=1e-6, rtol=1e-5)
    # merged: plain linears with dequantized weight + B A, the same logits
    before = _logits(run.model)
    merged = QLoRA.merge(run.model)
    assert type(merged.blocks[0].mixer.q) is torch.nn.Linear
    torch.testing.assert_close(_logits(merged), before, atol=1e-5, rtol=1e-5)
