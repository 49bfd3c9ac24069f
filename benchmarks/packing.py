"""SFT on instruction samples with a long-tailed length distribution: packed with document
boundaries (``data.packing=document``) vs one padded row per sample (``data.packing=none``),
side by side in one process on the same samples, same model, same number of rows per batch.

  real tokens/s  non-padding tokens trained on per second (forward + backward + AdamW step)
  pad fraction   padding tokens / all tokens the model ran on
  loss check     the mean loss of the first packed and padded batches of the same samples is
                 not compared here (tests/test_packing.py does that exactly); this is speed only

The samples are generated (lognormal response lengths, so most are short and a few fill the
context), written as jsonl and read by ``data=instructions``. Appends one record to
results/packing.jsonl.

    python benchmarks/packing.py [--samples 768] [--seq-len 256] [--block dense]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import llmzoo
from llmzoo.api import build_model, build_objective, build_tokenizer
from llmzoo.losses import run_objective
from llmzoo.shared.flops import device_description

HERE = Path(__file__).parent
WORDS = "the a cell gene protein binds folds codes for reads writes large small fast slow".split()


def make_samples(path: Path, n: int, sigma: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            words = max(1, int(math.exp(rng.gauss(2.6, sigma))))  # median ~13 words, a long tail
            fh.write(json.dumps({"instruction": "describe " + rng.choice(WORDS),
                                 "output": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def measure(cfg, packing: str, data_path: Path, batches: int) -> dict:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    tok = build_tokenizer(cfg)
    dm = instantiate(cfg.data, tokenizer=tok, path=str(data_path), packing=packing, _convert_="all")
    dm.prepare_data()
    dm.trainer = None
    dm.setup()
    model = build_model(cfg, vocab_size=tok.vocab_size)
    objective = build_objective(cfg, model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = iter(dm.train_dataloader())
    real = total = 0
    step_time = 0.0
    for i in range(batches + 2):
        batch = next(loader)
        t0 = time.perf_counter()
        loss = run_objective(model, objective, batch).value
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            step_time += time.perf_counter() - t0
            n_real = int((batch["doc_ids"] >= 0).sum()) if "doc_ids" in batch else \
                sum(len(r) for r in _unpadded(batch, tok.pad_id))
            real, total = real + n_real, total + batch["input_ids"].numel()
    return {"packing": packing, "rows": len(dm.train_rows), "real_tokens_per_s": real / step_time,
            "pad_fraction": 1 - real / total, "batches": batches}


def _unpadded(batch, pad_id):
    """Rows of a padded batch without their right padding (labels mark the response end: the eos)."""
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        labelled = (labels != -100).nonzero()
        out.append(ids[: int(labelled.max()) + 1] if len(labelled) else ids)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--block", default="dense")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of the response lengths (in words)")
    p.add_argument("--work", default=str(HERE / ".work" / "packing"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "instructions.jsonl"
    make_samples(data, args.samples, args.sigma)
    cfg = llmzoo.compose("train", ["model=tiny", f"block={args.block}", "objective=sft", "data=instructions",
                                   f"model.max_seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
                                   "data.val_fraction=0"])
    results = [measure(cfg, packing, data, args.batches) for packing in ("none", "document")]
    padded, packed = results
    record = {"time": time.strftime("%Y-%m-%d %H:%M"), "device": device_description(),
              "torch": torch.__version__, "block": args.block, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "samples": args.samples, "sigma": args.sigma, "results": results,
              "speedup_real_tokens": packed["real_tokens_per_s"] / padded["real_tokens_per_s"]}
    out = HERE / "results" / "packing.jsonl"
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    for r in results:
        print(f"{r['packing']:>9}: {r['rows']} rows, {r['real_tokens_per_s']:.0f} real tokens/s, "
              f"pad fraction {r['pad_fraction']:.2f}")
    print(f"packed / padded real tokens/s: {record['speedup_real_tokens']:.2f}x  -> {out}")


if __name__ == "__main__":
    main()
