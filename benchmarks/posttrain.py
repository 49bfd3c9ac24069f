"""Post-training speed and reward curves on CPU, in one run:

  DPO      optimizer steps/s (policy + frozen reference forward, batch of pairs)
  GRPO     rollout + update samples/s (responses generated and trained on per second)
  PPO      rollout + update samples/s (epochs x minibatches optimizer steps per rollout)
  plot     mean reward vs step of the GRPO and PPO runs (keyword reward "the")

A tiny dense model is pretrained on the bundled corpus and instruction-tuned first
(reused from ``--work``). Appends one record to results/posttrain.jsonl and writes
results/posttrain_rewards.png.

    python benchmarks/posttrain.py [--work benchmarks/.work/posttrain]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import llmzoo
from llmzoo.shared.flops import device_description

HERE = Path(__file__).parent
QUIET = ["trainer.enable_progress_bar=false", "logger=[]", "sample.prompts=[]",
         "trainer.log_every_n_steps=1", "trainer.val_every=0"]


def run(name: str, work: Path, *overrides: str) -> tuple[Path, float]:
    run_dir = work / name
    t0 = time.perf_counter()
    if not (run_dir / "model.safetensors").exists() or name not in ("pretrain", "sft"):
        llmzoo.train(llmzoo.compose("train", [f"run_dir={run_dir}", *QUIET, *overrides]))
    return run_dir, time.perf_counter() - t0


def rewards(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as fh:
        return [(int(r["step"]), float(r["train/reward"])) for r in csv.DictReader(fh) if r.get("train/reward")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / ".work" / "posttrain"))
    args = p.parse_args()
    work = Path(args.work)
    pre, _ = run("pretrain", work, "trainer.max_steps=300")
    sft, _ = run("sft", work, "experiment=sft_after_pretrain", f"init_from={pre}", "trainer.max_steps=150")
    steps = 40
    _, t_dpo = run("dpo", work, "experiment=dpo_after_sft", f"init_from={sft}", f"trainer.max_steps={steps}",
                   "data.batch_size=16")
    rl = ["data=prompts", "reward=keyword", "reward.word=the", f"init_from={pre}"]
    grpo, t_grpo = run("grpo", work, "objective=grpo", *rl, "trainer.max_steps=40", "data.batch_size=8",
                       "optim.lr=1e-3", "optim.warmup_steps=5")
    ppo, t_ppo = run("ppo", work, "objective=ppo", *rl, "trainer.max_steps=100", "data.batch_size=16",
                     "optim.lr=2e-4", "optim.warmup_steps=5")
    # samples = responses generated (and trained on): GRPO 8 prompts x 4, PPO 16 prompts x 1 per batch
    figures = {"dpo_steps_per_s": steps / t_dpo,
               "grpo_samples_per_s": 40 * 8 * 4 / t_grpo,
               "ppo_samples_per_s": (100 / 4) * 16 / t_ppo,  # 2 epochs x 2 minibatches = 4 steps per rollout
               "grpo_reward_first_last": [rewards(grpo)[0][1], rewards(grpo)[-1][1]],
               "ppo_reward_first_last": [rewards(ppo)[0][1], rewards(ppo)[-1][1]]}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rd in (("GRPO (8 prompts x 4 samples per rollout, 1 step)", grpo),
                     ("PPO (16 prompts per rollout, 4 steps)", ppo)):
        pts = rewards(rd)  # logged once per rollout batch
        ax.plot(range(len(pts)), [r for _, r in pts], "o-", ms=3, label=name)
    ax.set(xlabel="rollout batch", ylabel="mean reward (response contains 'the')", ylim=(-0.05, 1.05),
           title="RL on a tiny pretrained model (CPU), keyword reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results" / "posttrain_rewards.png", dpi=110)
    record = {"benchmark": "posttrain", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_description(),
              **figures}
    with open(HERE / "results" / "posttrain.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
