"""FSDP2 over 2 CPU processes (gloo) against one process on the same global batch;
sharded checkpoints: resume on 2 processes, consolidate into 1 for generation."""

import json

import pytest
import torch
from safetensors.torch import load_file

import llmzoo
from conftest import PARALLEL_COMMON, run_cli, tiny_cfg, train_run
from conftest import logged as losses
from llmzoo.config import ConfigError
from llmzoo.testing import check_strategy

COMMON = PARALLEL_COMMON


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """FSDP over 2 processes (4 rows each) and one process (8 rows), through the
    conformance kit's check_strategy: their losses already agree within 1e-4."""
    root = tmp_path_factory.mktemp("fsdp")
    check_strategy(["parallel=fsdp", "trainer.devices=2"], root, batch_size=4, atol=1e-4)
    (root / "single").symlink_to(root / "one")
    (root / "fsdp").symlink_to(root / "strategy")
    return root


@pytest.mark.distributed
def test_fsdp_two_processes_equal_one_process_and_shard_the_state(runs):
    single, fsdp = losses(runs / "single"), losses(runs / "fsdp")
    assert [s for s, _ in single] == [s for s, _ in fsdp] == [0, 1]
    for (_, a), (_, b) in zip(single, fsdp):  # fp32, same global batch of 8 sequences
        assert abs(a - b) < 1e-5, (single, fsdp)
    a, b = load_file(runs / "single" / "model.safetensors"), load_file(runs / "fsdp" / "model.safetensors")
    for k in a:  # the gathered final weights after 2 AdamW steps
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    one = json.loads((runs / "single" / "run_summary.json").read_text())
    two = json.loads((runs / "fsdp" / "run_summary.json").read_text())
    print(f"per-process MB: params {one['param_mb_per_process']:.3f} -> {two['param_mb_per_process']:.3f}, "
          f"AdamW state {one['optimizer_mb_per_process']:.3f} -> {two['optimizer_mb_per_process']:.3f}")
    for key in ("param_mb_per_process", "optimizer_mb_per_process"):  # about 1/2 each (uneven shards allowed)
        assert 0.45 < two[key] / one[key] < 0.6, (key, one[key], two[key])


@pytest.mark.distributed
def test_sharded_checkpoint_resumes_on_two_processes_and_loads_into_one(runs, tmp_path):
    ckpt = runs / "fsdp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per process
    resumed = tmp_path / "resumed"
    run_cli("llmzoo-train", "parallel=fsdp", "trainer.devices=2", "data.batch_size=4", f"run_dir={resumed}",
            f"ckpt_path={ckpt}", *COMMON[:-1], "trainer.max_steps=4", "seed=3")
    assert [s for s, _ in losses(resumed)] == [2, 3]  # continued at step 2
    # a single process reads the sharded folder: the same weights as the gathered final file
    run = llmzoo.load_checkpoint(ckpt)
    final = load_file(runs / "fsdp" / "model.safetensors")
    assert all(torch.equal(run.model.state_dict()[k], final[k]) for k in final)
    out = run_cli("llmzoo-generate", f"run_dir={runs / 'fsdp'}", "checkpoint=last", "prompt=Once", "max_new_tokens=5")
    assert out.stdout.startswith("Once")


@pytest.mark.slow  # kept out of the default run for time (~20 s)
@pytest.mark.distributed
def test_fsdp_activation_checkpointing_gives_the_same_losses(runs, tmp_path):
    run_cli("llmzoo-train", "parallel=fsdp", "trainer.devices=2", "data.batch_size=4",
            "parallel.activation_checkpointing=true", f"run_dir={tmp_path / 'ac'}", *COMMON)
    for (_, a), (_, b) in zip(losses(runs / "fsdp"), losses(tmp_path / "ac")):
        assert abs(a - b) < 1e-6


@pytest.mark.slow  # ~14 s; fused CE is checked against logits on one process by default (test_objective)
@pytest.mark.distributed
def test_fsdp_with_fused_cross_entropy_equals_one_process_with_logits(runs, tmp_path):
    """objective.fused_ce=true reads the head's weight after the model's forward: FSDP keeps
    the root (embedding, norm, head) gathered after its forward, so the loss and the
    reduce-scattered head gradient are those of one process computing full logits."""
    run_cli("llmzoo-train", "parallel=fsdp", "trainer.devices=2", "data.batch_size=4", "objective.fused_ce=true",
            "objective.fused_chunk=16", f"run_dir={tmp_path / 'fused'}", *COMMON)
    single, fused = losses(runs / "single"), losses(tmp_path / "fused")
    assert [s for s, _ in single] == [s for s, _ in fused] == [0, 1]
    for (_, a), (_, b) in zip(single, fused):
        assert abs(a - b) < 1e-5, (single, fused)
    a, b = load_file(runs / "single" / "model.safetensors"), load_file(tmp_path / "fused" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"parallel.mixed_precision='fp8' is not one of"):
        tiny_cfg("parallel=fsdp", "trainer.devices=2", "parallel.mixed_precision=fp8")
    with pytest.raises(ConfigError, match=r"must equal trainer.devices=2"):
        tiny_cfg("parallel=fsdp", "trainer.devices=2", "parallel.devices=4")


@pytest.mark.distributed
@pytest.mark.slow  # for time: FSDP shards every block the same way (fully_shard per block); dense runs by default
@pytest.mark.parametrize("block", ["moe", "mamba"])
def test_fsdp_shards_moe_and_mamba_blocks_too(tmp_path, block):
    train_run(f"block={block}", "parallel=single", "data.batch_size=8", f"run_dir={tmp_path / 'one'}",
            *COMMON)
    run_cli("llmzoo-train", f"block={block}", "parallel=fsdp", "trainer.devices=2", "data.batch_size=4",
            f"run_dir={tmp_path / 'two'}", *COMMON)
    # First-step cross-entropy equal. MoE's balance loss is a product of per-batch statistics,
    # computed per process as in any data parallelism: its value and gradient differ slightly,
    # so the step after differs by more than fp32 noise (Mamba: no aux loss, equal throughout).
    one, two = losses(tmp_path / "one", "train/ce"), losses(tmp_path / "two", "train/ce")
    assert abs(one[0][1] - two[0][1]) < 1e-5
    assert abs(one[1][1] - two[1][1]) < (1e-3 if block == "moe" else 1e-5)
