"""DDP over 2 CPU processes (gloo) against one process on the same global batch."""

import csv

import pytest
import torch

from conftest import FAST, run_cli

COMMON = [*FAST, "trainer.max_steps=2", "trainer.val_every=0", "trainer.log_every_n_steps=1",
          "trainer.accelerator=cpu", "optim.warmup_steps=1", "seed=3"]


def first_losses(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path):
    run_cli("llmzoo-train", "parallel=single", "data.batch_size=8", f"run_dir={tmp_path / 'single'}", *COMMON)
    run_cli("llmzoo-train", "parallel=ddp", "trainer.devices=2", "data.batch_size=4", f"run_dir={tmp_path / 'ddp'}",
            *COMMON)
    single, ddp = first_losses(tmp_path / "single"), first_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    # fp32, same global batch of 8 sequences: the mean of two rank means equals the full mean
    assert abs(single[0] - ddp[0]) < 1e-5, (single, ddp)
    assert abs(single[1] - ddp[1]) < 1e-4, (single, ddp)
    a = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"parameters differ at {k}")
