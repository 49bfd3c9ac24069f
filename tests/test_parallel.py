"""Tensor parallel, pipeline parallel and their meshes with FSDP, on 2 and 4 CPU
processes (gloo), against one process on the same global batch and seed.

The tiny model has 2 blocks: 2 pipeline stages of one block each.
Tolerance: fp32 losses within 1e-5 per step and weights within 1e-5 after two AdamW
steps (the sums are the same, only their order differs)."""


import pytest
import torch
from safetensors.torch import load_file

import llmzoo
from conftest import PARALLEL_COMMON, run_cli, tiny_cfg, train_run
from conftest import logged as losses
from llmzoo.config import ConfigError
from llmzoo_plugins.pipeline import balanced_split

COMMON = PARALLEL_COMMON
RESUME = [o for o in COMMON if not o.startswith("trainer.max_steps")]
LAYERS4 = [*COMMON, "model.n_layers=4"]  # interleaved pipelines: 4 stages of one block


def assert_same_run(one, other, loss_tol=1e-5, weight_tol=1e-5):
    a, b = losses(one), losses(other)
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 1]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < loss_tol, (a, b)
    wa, wb = load_file(one / "model.safetensors"), load_file(other / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # the gathered final weights after 2 AdamW steps
        torch.testing.assert_close(wb[k], wa[k], atol=weight_tol, rtol=1e-4, msg=k)


@pytest.fixture()
def single(single_process_run):
    return single_process_run


@pytest.mark.distributed
def test_tensor_parallel_with_sequence_parallel_equals_one_process(single, tmp_path):
    # two processes, each with half the heads and MLP units and half of the vocabulary;
    # norms and the residual stream split along the sequence (sequence parallel)
    run_cli("llmzoo-train", "parallel=tp", "trainer.devices=2", "parallel.sequence_parallel=true",
            "data.batch_size=8", f"run_dir={tmp_path / 'tp'}", *COMMON)
    assert_same_run(single, tmp_path / "tp")


@pytest.mark.distributed
def test_pipeline_equals_one_process_resumes_and_loads_into_one(single, tmp_path):
    run_cli("llmzoo-train", "parallel=pipeline", "trainer.devices=2", "parallel.schedule=1f1b",
            "parallel.microbatches=4", "data.batch_size=8", f"run_dir={tmp_path / 'pp'}", *COMMON)
    assert_same_run(single, tmp_path / "pp")
    ckpt = tmp_path / "pp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one file per stage
    # resume on 2 processes: the optimizer state of each stage comes back
    run_cli("llmzoo-train", "parallel=pipeline", "trainer.devices=2", "data.batch_size=8",
            f"run_dir={tmp_path / 'resumed'}", f"ckpt_path={ckpt}", *RESUME, "trainer.max_steps=3")
    assert [s for s, _ in losses(tmp_path / "resumed")] == [2]
    # one process reads every stage's part of the folder
    run = llmzoo.load_checkpoint(ckpt)
    final = load_file(tmp_path / "pp" / "model.safetensors")
    assert all(torch.equal(run.model.state_dict()[k], final[k]) for k in final)


@pytest.mark.distributed
@pytest.mark.parametrize("objective, data", [("sft", "instructions"), ("dpo", "preferences")])
def test_pipeline_runs_the_objectives_own_loss(tmp_path, objective, data):
    """SFT (padded rows, unequal labelled tokens per micro-batch) and DPO (pairs, a frozen
    reference on the last stage) under a 2-stage pipeline: the same losses as one process,
    because each micro-batch's loss is weighted by its share of the batch's tokens/pairs."""
    common = [*COMMON, f"objective={objective}", f"data={data}", "data.batch_size=4", "data.packing=none"]
    train_run("parallel=single", f"run_dir={tmp_path / 'one'}", *common)
    run_cli("llmzoo-train", "parallel=pipeline", "trainer.devices=2", "parallel.microbatches=2",
            f"run_dir={tmp_path / 'pp'}", *common)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "pp")
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 1]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    if objective == "dpo":  # the pipeline's metrics are combined over micro-batches the same way
        m1, m2 = losses(tmp_path / "one", "train/reward_margin"), losses(tmp_path / "pp", "train/reward_margin")
        assert abs(m1[1][1] - m2[1][1]) < 1e-5


@pytest.mark.slow  # ~21 s: 4 processes on 2 cores; the default run checks TP+SP and FSDP each on 2
@pytest.mark.distributed
def test_fsdp_times_tensor_parallel_on_four_processes(single, tmp_path):
    # mesh (data_parallel=2, tensor_parallel=2): each pipeline of data sees 4 of the 8 sequences
    run_cli("llmzoo-train", "parallel=fsdp_tp", "trainer.devices=4", "parallel.sequence_parallel=true",
            "data.batch_size=4", f"run_dir={tmp_path / 'fsdp_tp'}", *COMMON)
    assert_same_run(single, tmp_path / "fsdp_tp")
    assert len(list((tmp_path / "fsdp_tp" / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_times_pipeline_on_four_processes(single, tmp_path):
    run_cli("llmzoo-train", "parallel=pipeline", "trainer.devices=4", "parallel.stages=2", "parallel.data_parallel=2",
            "parallel.microbatches=2", "data.batch_size=4", f"run_dir={tmp_path / 'fsdp_pp'}", *COMMON)
    assert_same_run(single, tmp_path / "fsdp_pp")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_1f1b"])
def test_other_pipeline_schedules(tmp_path, schedule):
    train_run("parallel=single", "data.batch_size=8", f"run_dir={tmp_path / 'single'}", *LAYERS4)
    extra = ["parallel.stages_per_process=2"] if schedule == "interleaved_1f1b" else ["parallel.split=[1,3]"]
    run_cli("llmzoo-train", "parallel=pipeline", "trainer.devices=2", f"parallel.schedule={schedule}", *extra,
            "data.batch_size=8", f"run_dir={tmp_path / schedule}", *LAYERS4)
    assert_same_run(tmp_path / "single", tmp_path / schedule)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("block", ["moe", "mamba"])
def test_pipeline_runs_moe_and_mamba(tmp_path, block):
    common = COMMON
    train_run(f"block={block}", "parallel=single", "data.batch_size=8", f"run_dir={tmp_path / 'one'}",
            *common)
    run_cli("llmzoo-train", f"block={block}", "parallel=pipeline", "trainer.devices=2", "data.batch_size=8",
            f"run_dir={tmp_path / 'pp'}", *common)
    one, pp = losses(tmp_path / "one", "train/ce"), losses(tmp_path / "pp", "train/ce")
    assert abs(one[0][1] - pp[0][1]) < 1e-5
    # MoE's balance loss is computed per micro-batch (a product of batch statistics), so
    # the second step moves slightly differently; Mamba has no auxiliary loss
    assert abs(one[1][1] - pp[1][1]) < (1e-3 if block == "moe" else 1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_checkpoint_from_two_processes_resumes_on_four(tmp_path):
    run_cli("llmzoo-train", "parallel=fsdp", "trainer.devices=2", "data.batch_size=4", f"run_dir={tmp_path / 'two'}",
            *COMMON)
    run_cli("llmzoo-train", "parallel=fsdp", "trainer.devices=4", "data.batch_size=2", f"run_dir={tmp_path / 'four'}",
            f"ckpt_path={tmp_path / 'two' / 'checkpoints' / 'last.ckpt'}", *RESUME,
            "trainer.max_steps=3")
    assert [s for s, _ in losses(tmp_path / "four")] == [2]


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([10] * 4, 2) == [2, 2]
    assert balanced_split([10] * 4, 2, first_extra=25) == [1, 3]  # a big embedding on the first stage
    assert balanced_split([1, 1, 1, 10], 2) == [3, 1]
    assert sum(balanced_split([3, 1, 4, 1, 5, 9, 2, 6], 4)) == 8


@pytest.mark.parametrize("overrides, message", [
    (["parallel=tp", "trainer.devices=2", "block=moe"],
     r"parallel=.*requires block capabilities \['tensor_parallel'\], but block=.*lacks \['tensor_parallel'\]"),
    (["parallel=tp", "trainer.devices=2", "block=mamba"], r"lacks \['tensor_parallel'\]"),
    (["parallel=tp", "trainer.devices=4", "model.n_heads=2"],
     r"parallel.tensor_parallel=4 must divide the key/value heads \(model.n_kv_heads=2"),
    (["parallel=fsdp_tp", "trainer.devices=2"],
     r"the mesh parallel.data_parallel=2 x parallel.tensor_parallel=2 = 4 processes must equal the world "
     r"trainer.devices=2"),
    (["parallel=pipeline", "trainer.devices=4"], r"4 pipeline stages .* but only model.n_layers=2 layers"),
    (["parallel=pipeline", "trainer.devices=2", "parallel.data_parallel=2"],
     r"parallel.data_parallel=2 x parallel.stages=2 = 4 processes must equal the world"),
    (["parallel=pipeline", "trainer.devices=2", "parallel.split=[1,2]"],
     r"parallel.split=\[1, 2\] must be 'balanced' or a list of 2 positive layer counts adding up to model.n_layers=2"),
    (["parallel=pipeline", "trainer.devices=2", "parallel.microbatches=3", "data.batch_size=8"],
     r"parallel.microbatches=3 must divide data.batch_size=8"),
    (["parallel=pipeline", "trainer.devices=2", "parallel.schedule=zero_bubble"],
     r"parallel.schedule='zero_bubble' is not one of"),
    (["parallel=pipeline", "trainer.devices=2", "parallel.schedule=interleaved_1f1b"],
     r"interleaved_1f1b needs parallel.stages_per_process >= 2"),
    (["parallel=pipeline", "trainer.devices=2", "objective=reward", "data=preferences"],
     r"reads the model's hidden states, but a pipeline's last stage computes only the logits"),
    (["parallel=pipeline", "trainer.devices=2", "objective=ppo", "data=prompts", "reward=length"],
     r"objective=.* and parallel=.* both own the training step"),
])
def test_parallel_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)


def test_slurm_launcher_config_takes_the_world_from_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="llmzoo_conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "parallel=fsdp", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
