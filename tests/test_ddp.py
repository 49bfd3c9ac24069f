"""DDP over 2 CPU processes (gloo) against one process on the same global batch."""

import csv

import pytest
import torch

from conftest import FAST, run_cli
from llmzoo.testing import check_strategy

COMMON = [*FAST, "trainer.max_steps=2", "trainer.val_every=0", "trainer.log_every_n_steps=1",
          "trainer.accelerator=cpu", "optim.warmup_steps=1", "seed=3"]


def first_losses(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path):
    # llmzoo.testing.check_strategy: 4 rows on each of 2 processes against 8 on one (it
    # reads the 2 data-parallel replicas from the run summary); fp32, so the mean of two
    # rank means equals the full mean
    pairs = check_strategy(["parallel=ddp", "trainer.devices=2"], tmp_path, batch_size=4, atol=1e-4)
    assert abs(pairs[0][0] - pairs[0][1]) < 1e-5, pairs
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "strategy" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"parameters differ at {k}")
