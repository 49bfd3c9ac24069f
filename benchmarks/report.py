"""Turn benchmark records (benchmarks/results/*.jsonl) into markdown tables.

    python benchmarks/report.py [results/train_vs_hf.jsonl ...]
    python benchmarks/report.py --write-readme   # refresh the tables in benchmarks/README.md

Prints one table per benchmark, newest record last.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent


def train_vs_hf_rows(records: list[dict]) -> str:
    head = ("| when | commit | block (HF twin) | model (params) | batch x seq | llmzoo+Lightning tok/s "
            "| llmzoo plain tok/s | HF tok/s | llmzoo+Lightning / HF | llmzoo plain / HF | litgpt tok/s "
            "| llmzoo plain / litgpt | torchtitan tok/s | llmzoo plain / torchtitan |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        t, m = r["tokens_per_s"], r["model"]
        hf = t.get("hf_plain_loop", t.get("hf_llama_plain_loop"))
        block = r.get("block", "dense").rsplit(".", 1)[-1]
        block += " compiled" if r.get("compile") else ""
        rows.append(f"| {r['time']} | {r['commit']} | {block} ({r.get('hf_class', 'LlamaForCausalLM')}) "
                    f"| dim {m['dim']}, {m['n_layers']} layers ({r['params']['llmzoo'] / 1e6:.1f}M) "
                    f"| {r['batch_size']}x{r['seq_len']} | {t['llmzoo_lightning']:.0f} | {t['llmzoo_plain_loop']:.0f} "
                    f"| {hf:.0f} | **{r['ratio_llmzoo_lightning_vs_hf']:.2f}x** | {r['ratio_llmzoo_plain_vs_hf']:.2f}x "
                    + "".join(f"| {t[f'{peer}_plain_loop']:.0f} | **{r[f'ratio_llmzoo_plain_vs_{peer}']:.2f}x** "
                              if f"{peer}_plain_loop" in t else "| - | - " for peer in ("litgpt", "torchtitan")) + "|")
    return head + "\n" + "\n".join(rows)


def blocks_rows(records: list[dict]) -> str:
    out = []
    for r in records[-1:]:  # the newest run; older ones stay in the .jsonl
        s = r["shape"]
        out.append(f"{r['time']} on {r['device']}, torch {r['torch']}; dim {s['dim']}, {s['n_layers']} layers, "
                   f"batch {r['train_batch']['batch_size']} x {r['train_batch']['seq_len']}\n")
        dense = next((t["tokens_per_s"] for t in r["train"] if t["block"] == "dense"), None)
        out.append("| block | params total | params active | train tok/s | vs dense | peak RSS MB |\n|---|---|---|---|---|---|")
        for t in r["train"]:
            rel = f"{t['tokens_per_s'] / dense:.2f}x" if dense else "-"
            out.append(f"| {t['block']} | {t['params_total'] / 1e6:.2f}M | {t['params_active'] / 1e6:.2f}M "
                       f"| {t['tokens_per_s']:.0f} | {rel} | {t['peak_rss_mb']:.0f} |")
        out.append("\n| block | decode ms/token by context | long / short |\n|---|---|---|")
        by_block: dict[str, list] = {}
        for d in r["decode"]:
            by_block.setdefault(d["block"], []).append(d)
        for block, ds in by_block.items():
            ds = sorted(ds, key=lambda d: d["context"])
            cells = ", ".join(f"{d['context']}: {d['ms_per_token']:.2f}" for d in ds)
            out.append(f"| {block} | {cells} | **{ds[-1]['ms_per_token'] / ds[0]['ms_per_token']:.2f}x** |")
        out.append("\n| scan at T=%d | step-by-step ms | fast ms | speedup |\n|---|---|---|---|" % r["scan"][0]["seq_len"])
        for sc in r["scan"]:
            out.append(f"| {sc['scan']} | {sc['reference_ms']:.1f} | {sc['fast_ms']:.1f} | **{sc['speedup']:.1f}x** |")
        m = r["moe"]
        out.append(f"\nMoE ({m['n_experts']} experts, top-{m['top_k']}, {m['tokens']} tokens, dim {m['dim']}, "
                   f"forward+backward): dense per-expert loop {m['reference_ms']:.0f} ms, dispatched `torch` "
                   f"backend {m['torch_ms']:.0f} ms: **{m['speedup']:.2f}x** (grouped GEMM: {m['grouped_mm']})")
    return "\n".join(out)


def decode_rows(records: list[dict]) -> str:
    """The newest run, then the newest older run of each method it did not time (a run may
    time a subset: ``bench.methods``); everything stays in the .jsonl."""
    shown, seen = [records[-1]], set(records[-1]["results"])
    for r in reversed(records[:-1]):
        if set(r["results"]) - seen:
            shown.append(r)
            seen |= set(r["results"])
    return "\n\n".join(_decode_table(r) for r in shown)


def _decode_table(r: dict) -> str:
    out = [f"{r['time']} on {r['device']}, torch {r['torch']}; target "
           f"{' '.join(r['shape'])} ({r['params'] / 1e6:.2f}M params) trained on the bundled corpus; batch 1 "
           f"(``*_batch``: all {r['prompts']} prompts in one call), "
           f"{r['prompts']} prompts x {r['new_tokens']} new tokens, median of {r['repeats']}\n",
           "| method | tokens/s | vs HF generate | vs eager greedy | vs batched greedy | accepted / step | same tokens as greedy |",
           "|---|---|---|---|---|---|---|"]
    for name, m in r["results"].items():
        acc = f"{m['accepted_per_step']:.2f}" if "accepted_per_step" in m else "-"
        vs_batch = f"{m['ratio_vs_greedy_batch']:.2f}x" if "ratio_vs_greedy_batch" in m else "-"
        vs_hf = f"**{m['ratio_vs_hf_generate']:.2f}x**" if "ratio_vs_hf_generate" in m else "-"  # not timed in that run
        vs_greedy = f"{m['ratio_vs_greedy']:.2f}x" if "ratio_vs_greedy" in m else "-"
        out.append(f"| {name} | {m['tokens_per_s']:.0f} | {vs_hf} | {vs_greedy} | {vs_batch} | {acc} "
                   f"| {m.get('same_as_greedy', '-')} |")
    return "\n".join(out)


def posttrain_rows(records: list[dict]) -> str:
    r = records[-1]
    return (f"{r['time']} on {r['device']}; tiny dense model (0.13M), end to end per run (setup included)\n\n"
            "| measurement | value |\n|---|---|\n"
            f"| DPO optimizer steps/s (16 pairs, policy + reference) | {r['dpo_steps_per_s']:.2f} |\n"
            f"| GRPO samples/s (rollout + update, 32 responses/step) | {r['grpo_samples_per_s']:.1f} |\n"
            f"| PPO samples/s (rollout + 4 updates, 16 responses/rollout) | {r['ppo_samples_per_s']:.1f} |\n"
            f"| GRPO mean reward, first -> last step | {r['grpo_reward_first_last'][0]:.2f} -> "
            f"{r['grpo_reward_first_last'][1]:.2f} |\n"
            f"| PPO mean reward, first -> last rollout | {r['ppo_reward_first_last'][0]:.2f} -> "
            f"{r['ppo_reward_first_last'][1]:.2f} |\n\n![rewards](results/posttrain_rewards.png)")


def parallel_rows(records: list[dict]) -> str:
    r = records[-1]
    out = [f"{r['time']} on {r['device']}; model={r['model']}, global batch {r['global_batch']} x {r['seq_len']}, "
           f"{r['steps']} steps; 2-process runs share the same 2 cores\n",
           "| strategy | tokens/s | vs single | params MB / process | AdamW MB / process | state vs single |",
           "|---|---|---|---|---|---|"]
    for name, m in r["results"].items():
        out.append(f"| {name} | {m['tokens_per_s']:.0f} | {m['tokens_per_s_vs_single']:.2f}x "
                   f"| {m['param_mb_per_process']:.2f} | {m['optimizer_mb_per_process']:.2f} "
                   f"| **{m['state_per_process_vs_single']:.2f}x** |")
    return "\n".join(out)


def gpu_rows(records: list[dict]) -> str:
    """benchmarks/gpu_suite.sh records: the newest of each section."""
    newest = {r["section"]: r for r in records if "error" not in r}
    out = []
    if newest:
        first = next(iter(newest.values()))
        out.append(f"{first['device']}, torch {first['torch']}, commit {first['commit']}\n")
    out.append("| measurement | figure | detail |\n|---|---|---|")
    if "train_1b" in newest:
        r = newest["train_1b"]
        for name, v in r["variants"].items():
            out.append(f"| 1B dense training, bf16 autocast, {name} | {v['tokens_per_s']:,.0f} tok/s, "
                       f"**MFU {v['mfu']:.1%}** | batch {r['batch']} x {r['seq_len']}, "
                       f"peak {v['peak_mem_gib']:.1f} GiB, first step {v['first_step_s']:.0f} s |")
    if "fsdp_ac" in newest:
        r = newest["fsdp_ac"]
        for name, v in r["variants"].items():
            out.append(f"| 1B FSDP2 (1 process, bf16 params), {name.replace('_', ' ')} | {v['tokens_per_s']:,.0f} tok/s "
                       f"| peak {v['peak_mem_gib']:.1f} GiB |")
    if "decode_7b" in newest:
        r = newest["decode_7b"]
        for name, v in r["variants"].items():
            out.append(f"| 7B bf16 decode, batch 1, {name.replace('_', ' ')} | {v['tokens_per_s']:.1f} tok/s = "
                       f"**{v['pct_of_hbm_roofline']:.0f}% of the HBM roofline** | roofline "
                       f"{r['roofline_tokens_per_s']:.0f} tok/s ({r['bytes_per_token'] / 1e9:.2f} GB/token at "
                       f"{r['hbm_bytes_per_s'] / 1e12:.2f} TB/s) |")
    if "moe" in newest:
        r = newest["moe"]
        out.append(f"| MoE grouped GEMM vs per-expert loop, bf16 fwd+bwd | **{r['speedup']:.2f}x** "
                   f"| {r['grouped_ms']:.2f} vs {r['loop_ms']:.2f} ms, {r['n_experts']} experts top-{r['top_k']}, "
                   f"{r['tokens']} tokens |")
    if "mamba2" in newest:
        r = newest["mamba2"]
        for name, v in r["variants"].items():
            out.append(f"| Mamba-2 fla Triton vs chunked PyTorch, {name} | **{v['speedup']:.2f}x** "
                       f"| {v['triton_ms']:.2f} vs {v['torch_ms']:.2f} ms, relative diff {v['max_rel_diff']:.1e} |")
    if "fused_ce" in newest:
        r = newest["fused_ce"]
        base = r["variants"].get("logits", {})
        for name, v in r["variants"].items():
            if "ms" in v and "ms" in base:
                out.append(f"| head + cross-entropy, {name}, bf16 fwd+bwd, V={r['shape']['vocab']} | {v['ms']:.1f} ms, "
                           f"**{v['peak_mib'] / 1024:.2f} GiB** | {base['ms'] / v['ms']:.2f}x the logits path's speed, "
                           f"{v['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x its memory |")
    if "kernels" in newest:
        r = newest["kernels"]
        for name, v in r["variants"].items():
            out.append(f"| Liger {name} vs reference, bf16 fwd+bwd | **{v['speedup']:.2f}x** "
                       f"| {v['liger_ms']:.2f} vs {v['reference_ms']:.2f} ms |")
    return "\n".join(out)


def fused_ce_rows(records: list[dict]) -> str:
    """benchmarks/fused_ce.py: every record (one per shape), newest last."""
    out = ["| machine, date | shape | part | variant | ms / step | peak MiB | speed vs logits | memory vs logits |",
           "|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["shape"]
        for row in r["rows"]:
            if "ms" not in row:
                continue
            shape = (f"{s['tokens']} tokens, D={s['dim']}, V={s['vocab']}, {s['dtype']}" if row["part"] == "loss"
                     else f"model={s['model']}, {s['batch']} x {s['seq']}, V={s['vocab']}")
            out.append(f"| {r['device']}, {r['time'][:10]} | {shape} | {row['part']} | {row['variant']} "
                       f"| {row['ms']:.0f} | {row['peak_mib']:.0f} | {row.get('speed_vs_logits', 1):.2f}x "
                       f"| **{row.get('memory_vs_logits', 1):.2f}x** |")
    return "\n".join(out)


def serve_rows(records: list[dict]) -> str:
    """benchmarks/serve_bench.py: the newest run (its records share a time prefix to the minute)."""
    last = records[-1]["time"][:16]
    run = [r for r in records if r["time"][:16] == last]
    r0 = run[0]
    out = [f"{r0['time']} on {r0['device']}, torch {r0['torch']}; model={r0['model']}, greedy, {r0['max_tokens'] // 4} to {r0['max_tokens'] * 7 // 4} "
           f"tokens per request (the same lengths for every server), {r0['requests_per_client']} streamed requests per client in a row\n",
           "| server | clients | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | failed |", "|---|---|---|---|---|---|"]
    for r in run:
        if "error" in r:
            out.append(f"| {r['server']} | {r.get('clients', '-')} | not measured | | | |")
        else:
            out.append(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} "
                       f"| {r['ttft_p99_ms']:.0f} | {r['failed']} |")
    return "\n".join(out)


RENDER = {"parallel": parallel_rows, "train_vs_hf": train_vs_hf_rows, "blocks": blocks_rows, "decode": decode_rows,
          "decode_gpu": decode_rows, "posttrain": posttrain_rows, "gpu": gpu_rows, "serve": serve_rows,
          "fused_ce": fused_ce_rows}


def load(paths: list[str]) -> dict[str, list[dict]]:
    files = [Path(p) for p in paths] or sorted((HERE / "results").glob("*.jsonl"))
    by_kind: dict[str, list[dict]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_kind.setdefault(r.get("benchmark", f.stem), []).append(r)
    return by_kind


def render(kind: str, records: list[dict]) -> str:
    return RENDER[kind](records) if kind in RENDER else "\n".join(json.dumps(r) for r in records)


def headline(by_kind: dict[str, list[dict]]) -> str:
    """The few ratios the project README shows, newest record of each kind."""
    lines = []
    hf = {}
    for r in by_kind.get("train_vs_hf", []):
        hf[(r.get("hf_class", "LlamaForCausalLM"), bool(r.get("compile")))] = r
    for (cls, compiled), r in hf.items():
        how = "llmzoo compiled, HF eager" if compiled else "both eager"
        lines.append(f"| training vs HF `{cls}` (same shape, fp32, {how}) "
                     f"| **{r['ratio_llmzoo_lightning_vs_hf']:.2f}x** | {r['device']}, {r['time'][:10]} |")
        for peer, cls in (("litgpt", "GPT"), ("torchtitan", "Llama3Model")):
            if f"ratio_llmzoo_lightning_vs_{peer}" in r:
                lines.append(f"| training vs {peer} `{cls}` (same shape, fp32, {how.replace('HF', peer)}) "
                             f"| **{r[f'ratio_llmzoo_lightning_vs_{peer}']:.2f}x** | {r['device']}, {r['time'][:10]} |")
    if by_kind.get("blocks"):
        b = by_kind["blocks"][-1]
        dec = {(d["block"], d["context"]): d["ms_per_token"] for d in b["decode"]}
        ctx = sorted({c for _, c in dec})
        for block in sorted({k for k, _ in dec}):
            lines.append(f"| {block} decode ms/token, context {ctx[-1]} vs {ctx[0]} "
                         f"| {dec[(block, ctx[-1])] / dec[(block, ctx[0])]:.2f}x | {b['device']}, {b['time'][:10]} |")
        for sc in b["scan"]:
            lines.append(f"| {sc['scan']} vs step-by-step, T={sc['seq_len']} | {sc['speedup']:.1f}x "
                         f"| {b['device']}, {b['time'][:10]} |")
        lines.append(f"| MoE dispatch vs per-expert loop ({b['moe']['n_experts']} experts, top-{b['moe']['top_k']}) "
                     f"| {b['moe']['speedup']:.2f}x | {b['device']}, {b['time'][:10]} |")
    trains = [(r, row) for r in by_kind.get("fused_ce", []) for row in r["rows"]
              if row["part"] == "train" and row["variant"] == "fused" and "speed_vs_logits" in row]
    if trains:
        r, row = trains[-1]
        lines.append(f"| training step, `objective.fused_ce=true` vs full logits (model={r['shape']['model']}, "
                     f"V={r['shape']['vocab']}): speed, peak memory {row['memory_vs_logits']:.2f}x "
                     f"| {row['speed_vs_logits']:.2f}x | {r['device']}, {r['time'][:10]} |")
    if by_kind.get("decode"):
        d = by_kind["decode"][-1]
        res, when = d["results"], f"{d['device']}, {d['time'][:10]}"
        vs_hf = [r for r in by_kind["decode"] if "ratio_vs_hf_generate" in r["results"].get("static_compile", {})]
        if vs_hf:  # the newest run that timed HF generate
            lines.append(f"| batch-1 decoding, static cache + compile vs HF `generate` "
                         f"| {vs_hf[-1]['results']['static_compile']['ratio_vs_hf_generate']:.2f}x "
                         f"| {vs_hf[-1]['device']}, {vs_hf[-1]['time'][:10]} |")
        for name in ("medusa", "medusa_compile", "eagle", "speculative_draft", "speculative_draft_compile"):
            if name in res and "ratio_vs_greedy" in res[name]:
                lines.append(f"| batch-1 decoding, {name} vs eager greedy ({res[name]['accepted_per_step']:.2f} "
                             f"tokens/step) | {res[name]['ratio_vs_greedy']:.2f}x | {when} |")
    if by_kind.get("decode_gpu"):
        d = by_kind["decode_gpu"][-1]
        res = d["results"]
        for name in ("medusa", "medusa_compile", "eagle"):
            if name in res and "ratio_vs_greedy" in res[name]:
                lines.append(f"| batch-1 decoding on GPU, {name} vs eager greedy ({res[name]['accepted_per_step']:.2f} "
                             f"tokens/step) | {res[name]['ratio_vs_greedy']:.2f}x | {d['device']}, {d['time'][:10]} |")
    serve = [r for r in by_kind.get("serve", []) if "error" not in r]
    if serve:
        last = serve[-1]["time"][:16]
        at = {(r["server"], r["clients"]): r for r in serve if r["time"][:16] == last}
        top = max(c for _, c in at)
        for other in ("transformers", "llmzoo-static"):
            if ("llmzoo-continuous", top) in at and (other, top) in at:
                ratio = at["llmzoo-continuous", top]["tokens_per_s"] / at[other, top]["tokens_per_s"]
                lines.append(f"| llmzoo-serve throughput, {top} clients, vs {other.replace('llmzoo-static', 'static batching')}"
                             f"{' serve (same weights)' if other == 'transformers' else ''} | {ratio:.2f}x "
                             f"| {serve[-1]['device']}, {last[:10]} |")
        if ("llmzoo-continuous", top) in at and ("llmzoo-static", top) in at:
            c, st = at["llmzoo-continuous", top], at["llmzoo-static", top]
            lines.append(f"| llmzoo-serve p50 time to first token, {top} clients: static / continuous batching "
                         f"({st['ttft_p50_ms']:.0f} / {c['ttft_p50_ms']:.0f} ms) | {st['ttft_p50_ms'] / c['ttft_p50_ms']:.2f}x "
                         f"| {serve[-1]['device']}, {last[:10]} |")
    gpu = {r["section"]: r for r in by_kind.get("gpu", []) if "error" not in r}
    if "train_1b" in gpu:
        r = gpu["train_1b"]
        best = max(r["variants"].items(), key=lambda kv: kv[1]["mfu"])
        lines.append(f"| 1B dense bf16 training MFU ({best[0]}) | {best[1]['mfu']:.1%} "
                     f"| {r['device']}, {r['time'][:10]} |")
    if "decode_7b" in gpu:
        r = gpu["decode_7b"]
        best = max(r["variants"].items(), key=lambda kv: kv[1]["pct_of_hbm_roofline"])
        lines.append(f"| 7B bf16 batch-1 decode ({best[0].replace('_', ' ')}) vs the HBM roofline "
                     f"| {best[1]['pct_of_hbm_roofline']:.0f}% | {r['device']}, {r['time'][:10]} |")
    return "| measurement | ratio | machine, date |\n|---|---|---|\n" + "\n".join(lines)


def _fill(path: Path, kind: str, body: str) -> None:
    text = path.read_text()
    text = re.sub(rf"(<!-- report:{kind} -->\n).*?(<!-- /report -->)", lambda m: m.group(1) + body + "\n" + m.group(2),
                  text, flags=re.S)
    path.write_text(text)


def write_readme(by_kind: dict[str, list[dict]]) -> None:
    readme = HERE / "README.md"
    for kind, records in by_kind.items():
        _fill(readme, kind, render(kind, records))
    _fill(HERE.parent / "README.md", "headline", headline(by_kind))
    print(f"updated {readme} and {HERE.parent / 'README.md'}")


def main(args: list[str]) -> None:
    by_kind = load([a for a in args if not a.startswith("--")])
    if "--write-readme" in args:
        write_readme(by_kind)
        return
    for kind, records in by_kind.items():
        print(f"### {kind}\n\n{render(kind, records)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
