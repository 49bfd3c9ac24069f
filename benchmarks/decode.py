"""Decoding speed of every decoder on one trained model, in one run (batch 1; the
``*_batch`` methods decode all prompts in one call, rows at their own positions):

  hf_generate              transformers LlamaForCausalLM.generate, same weights (greedy)
  greedy                   llmzoo eager decoding with a growing KV cache
  static_compile           static KV cache + torch.compile'd step (decoder=static)
  medusa                   Medusa-1 heads trained on the corpus, tree verification
  medusa_compile           the same over a static KV cache with the tree step compiled (decoder.compile=true)
  eagle                    an EAGLE draft head trained on the same target, chain of 4 drafts
  eagle_compile            the same chain with the target's verify forward compiled over static KV caches
  eagle_tree               the same head drafting EAGLE-2's dynamic tree (width 4, 4 deep, 16 verified)
  speculative_early_exit   draft = the target's first block (decoder.draft_layers=1)
  speculative_draft        draft = a separately trained 2-layer dim-64 model
  speculative_*_compile    the same over static KV caches, verify and draft steps compiled
  int8, int4               greedy on weight-only quantized copies
  greedy_batch, medusa_batch, eagle_batch, speculative_*_batch   the same decoders over the whole batch

The target (and the draft, and the Medusa heads) are trained on the bundled corpus
first, so acceptance rates are real; runs are reused from ``bench.work_dir``. Every
method decodes the same prompts to exactly ``new_tokens`` tokens (no eos stop);
tokens/s is the median over ``repeats`` after one untimed warm-up (which holds the
compilation). Ratios are against transformers' generate and against eager greedy; a
``same_as_greedy`` flag says whether the method's tokens equal eager greedy's.

    python benchmarks/decode.py [bench.repeats=5] [bench.methods=[greedy,static_compile]]
    python benchmarks/report.py --write-readme
"""

from __future__ import annotations

import copy
import json
import signal
import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import llmzoo
from llmzoo.shared.flops import device_description


def trained_run(name: str, overrides: list[str], b: DictConfig) -> Path:
    run_dir = Path(hydra.utils.to_absolute_path(b.work_dir)) / name
    if not (run_dir / "model.safetensors").exists():
        cfg = llmzoo.compose("train", [f"run_dir={run_dir}", "sample.prompts=[]", "logger=[]",
                                       "trainer.enable_progress_bar=false", *overrides])
        llmzoo.train(cfg)
    return run_dir


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def hf_twin(model):
    import transformers

    from llmzoo_plugins.hf_models import hf_state_dict

    b, a = model.blocks[0], model.blocks[0].mixer
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.dim, intermediate_size=b.ffn.hidden,
        num_hidden_layers=len(model.blocks), num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        max_position_embeddings=model.max_seq_len, rms_norm_eps=b.mixer_norm.eps, rope_theta=a.rope_theta,
        tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    hf.load_state_dict(hf_state_dict(model), strict=False)
    return hf


def methods(b: DictConfig, run, draft_run, eagle_run=None):
    """name -> (decode function prompts -> list of outputs, decoder or None for stats)."""
    from llmzoo_plugins.eagle import Eagle
    from llmzoo_plugins.medusa import Medusa
    from llmzoo_plugins.quantize import Quantize
    from llmzoo_plugins.sampling import Greedy
    from llmzoo_plugins.speculative import Speculative
    from llmzoo_plugins.static_cache import StaticCache

    n, model = b.new_tokens, run.model

    def one_by_one(decoder, m):
        return lambda prompts: [decoder.generate(m, [p], max_new_tokens=n)[0] for p in prompts], decoder

    def batched(decoder, m):  # every prompt in one generate call (rows decode together)
        return lambda prompts: decoder.generate(m, prompts, max_new_tokens=n), decoder

    def hf_generate():
        hf = hf_twin(model).to(b.device)

        def go(prompts):
            return [hf.generate(torch.tensor([p], device=b.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        return go, None

    table = {
        "hf_generate": hf_generate,
        "greedy": lambda: one_by_one(Greedy(), model),
        "static_compile": lambda: one_by_one(StaticCache(), model),
        "medusa": lambda: one_by_one(Medusa(heads=run.objective), model),
        "medusa_compile": lambda: one_by_one(Medusa(heads=run.objective, compile=True), model),
        "eagle": lambda: one_by_one(Eagle(head=eagle_run.objective), model),
        "eagle_compile": lambda: one_by_one(Eagle(head=eagle_run.objective, compile=True), model),
        "eagle_tree": lambda: one_by_one(Eagle(head=eagle_run.objective, draft="tree"), model),
        "speculative_early_exit": lambda: one_by_one(Speculative(k=4, draft_layers=1), model),
        "speculative_draft": lambda: one_by_one(Speculative(k=4, draft=draft_run.model), model),
        "speculative_early_exit_compile": lambda: one_by_one(Speculative(k=4, draft_layers=1, compile=True), model),
        "speculative_draft_compile": lambda: one_by_one(Speculative(k=4, draft=draft_run.model, compile=True), model),
        "greedy_batch": lambda: batched(Greedy(), model),
        "medusa_batch": lambda: batched(Medusa(heads=run.objective), model),
        "eagle_batch": lambda: batched(Eagle(head=eagle_run.objective), model),
        "speculative_early_exit_batch": lambda: batched(Speculative(k=4, draft_layers=1), model),
        "speculative_draft_batch": lambda: batched(Speculative(k=4, draft=draft_run.model), model),
        "int8": lambda: one_by_one(Greedy(), Quantize("int8")(copy.deepcopy(model))),
        "int4": lambda: one_by_one(Greedy(), Quantize("int4")(copy.deepcopy(model))),
    }
    unknown = set(b.methods) - set(table)
    if unknown:
        raise SystemExit(f"bench.methods: unknown {sorted(unknown)} (allowed: {sorted(table)})")
    return {name: table[name] for name in b.methods}


@hydra.main(config_path="pkg://llmzoo_conf", config_name="bench_decode", version_base="1.3")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    torch.manual_seed(0)
    pre = trained_run("pretrain", [*b.shape, f"trainer.max_steps={b.pretrain_steps}"], b)
    med = trained_run("medusa", [*b.shape, "objective=medusa", f"init_from={pre}", f"trainer.max_steps={b.medusa_steps}"], b)
    drf = trained_run("draft", [*b.draft_shape, f"trainer.max_steps={b.pretrain_steps}"], b)
    eag = trained_run("eagle", [*b.shape, "objective=eagle", f"init_from={pre}", f"trainer.max_steps={b.medusa_steps}"], b) \
        if any(m.startswith("eagle") for m in b.methods) else None
    run, draft_run = llmzoo.load_run(med), llmzoo.load_run(drf)
    eagle_run = llmzoo.load_run(eag) if eag else None
    if eagle_run is not None:
        eagle_run = eagle_run._replace(objective=eagle_run.objective.to(b.device))
    run = run._replace(model=run.model.to(b.device), objective=run.objective.to(b.device))
    draft_run = draft_run._replace(model=draft_run.model.to(b.device))
    prompts = [run.tokenizer.encode(p) for p in b.prompts]
    results, reference, stopped = {}, None, None

    def on_term(signum, frame):  # `timeout` (the GPU suite) sends SIGTERM: keep what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for name, make in methods(b, run, draft_run, eagle_run).items():
            stopped = name
            go, decoder = make()
            with torch.no_grad():
                outs = go(prompts)  # warm-up (compilation happens here)
                times = []
                for _ in range(b.repeats):
                    sync(b.device)
                    t0 = time.perf_counter()
                    go(prompts)
                    sync(b.device)
                    times.append(time.perf_counter() - t0)
            if name == "greedy":
                reference = outs
            tokens = sum(len(o) for o in outs)
            results[name] = {"tokens_per_s": tokens / statistics.median(times), "outputs": outs,
                             **({"accepted_per_step": decoder.stats["accepted_per_step"]}
                                if decoder is not None and "accepted_per_step" in decoder.stats else {})}
            print(f"{name:>24}: {results[name]['tokens_per_s']:8.1f} tokens/s", flush=True)
        stopped = None
    except KeyboardInterrupt:
        print(f"stopped during {stopped}: recording the {len(results)} methods measured", flush=True)
        if not results:
            raise SystemExit(124)
    for name, r in results.items():
        outs = r.pop("outputs")
        if reference is not None:
            r["same_as_greedy"] = outs == reference
        if "hf_generate" in results:
            r["ratio_vs_hf_generate"] = r["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
        if "greedy" in results:
            r["ratio_vs_greedy"] = r["tokens_per_s"] / results["greedy"]["tokens_per_s"]
        if "greedy_batch" in results and name.endswith("_batch"):
            r["ratio_vs_greedy_batch"] = r["tokens_per_s"] / results["greedy_batch"]["tokens_per_s"]
    from train_vs_hf import git_commit  # the script folder is on sys.path

    record = {"benchmark": "decode" if b.device == "cpu" else "decode_gpu", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit(),
              "device": device_description(),
              "decode_device": str(b.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "shape": list(b.shape), "params": run.model.num_parameters(), "new_tokens": b.new_tokens,
              "prompts": len(prompts), "repeats": b.repeats, "results": results,
              **({"stopped_during": stopped} if stopped else {})}
    out = Path(hydra.utils.to_absolute_path(b.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
