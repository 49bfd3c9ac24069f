"""Converting a ~1B Hugging Face checkpoint, made locally (random bf16 weights, Llama shape,
sharded safetensors with an index): time and peak memory of ``llmzoo import-hf`` and
``llmzoo export-hf``, against the size of one copy of the weights.

Each conversion runs in a fresh process. Peak memory is reported two ways: the process's
peak resident set (VmHWM, which also counts the checkpoint's memory-mapped pages the
reader touched) and the peak of anonymous memory (RssAnon, sampled every 10 ms: the
copies the program itself holds). The goal is peak <= 1.2 x one copy.

    python benchmarks/hf_convert.py [--dim 2048 --layers 16] [--work /tmp/llmzoo_hf_bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "hf_convert.jsonl"

CHILD = r"""
import json, sys, threading, time
import torch

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], rss("RssAnon:"))
        time.sleep(0.01)

from llmzoo_plugins.hf_io import export_hf, import_hf
from llmzoo.api import load_run
base = rss("RssAnon:")
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if sys.argv[1] == "import":
    import_hf(sys.argv[2], sys.argv[3], dtype="bfloat16", overwrite=True)
else:
    export_hf(load_run(sys.argv[2]), sys.argv[3])
seconds = time.perf_counter() - t0
time.sleep(0.05)
print(json.dumps({"seconds": seconds, "peak_anon_bytes": peak[0] - base, "vm_hwm_bytes": rss("VmHWM:"),
                  "baseline_anon_bytes": base}))
"""


def make_checkpoint(folder: Path, dim: int, layers: int, vocab: int, shard_bytes: int) -> int:
    """A Llama-shaped folder with random bf16 weights written shard by shard; returns the bytes of weights."""
    import torch
    from safetensors.torch import save_file

    heads, kv, hidden = dim // 64, max(1, dim // 256), int(dim * 2.75) // 64 * 64
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (kv * 64, dim),
                       p + "self_attn.v_proj.weight": (kv * 64, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) if len(shape) > 1 \
            else torch.ones(shape, dtype=torch.bfloat16)
        shard[name], size, total = t, size + t.numel() * 2, total + t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    from llmzoo_plugins.tokenizers import ByteTokenizer

    ByteTokenizer().hf_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return total


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--work", default="/tmp/llmzoo_hf_bench")
    a = p.parse_args()
    work = Path(a.work)
    hf = work / "hf"
    t0 = time.perf_counter()
    weights = make_checkpoint(hf, a.dim, a.layers, a.vocab, shard_bytes=500 * 2**20)
    print(f"made {weights / 2**30:.2f} GiB of bf16 weights in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rec = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "params": weights // 2, "weights_bytes": weights}
    for step, args in (("import", (str(hf), str(work / "run"))), ("export", (str(work / "run"), str(work / "out")))):
        r = child(step, *args)
        rec[step] = {**r, "peak_anon_x_weights": r["peak_anon_bytes"] / weights,
                     "vm_hwm_x_weights": r["vm_hwm_bytes"] / weights}
        print(f"{step}: {r['seconds']:.1f}s, peak anonymous {r['peak_anon_bytes'] / 2**30:.2f} GiB "
              f"({rec[step]['peak_anon_x_weights']:.2f}x the weights), peak RSS {r['vm_hwm_bytes'] / 2**30:.2f} GiB "
              f"({rec[step]['vm_hwm_x_weights']:.2f}x)", file=sys.stderr)
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
