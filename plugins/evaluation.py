"""Evaluation of a trained run (``llmzoo-eval``, a Hydra app over conf/eval.yaml).

Local tasks, read from local files (nothing is downloaded), chosen with ``eval_task=[...]``:
  perplexity  token perplexity and bits per byte of a text set (one document per line
              of a .txt file, or a jsonl text field); each document is scored on its own,
              in windows of the model's context that keep as much context as possible
  choice      multiple choice: the answer is the choice with the highest log-likelihood
              (acc) or the highest per-byte log-likelihood (acc_norm)
  generate    greedy generation until a stop string, scored by exact match
``k`` in-context examples (drawn with ``seed`` from the other rows of the same file,
the GPT-3 way of few-shot evaluation) precede each question of choice and generate tasks.
lm-evaluation-harness tasks run through the ``llmzoo`` model (``lm_eval_model``, at the end
of this file; ``lm_eval.tasks=[...]``). Results are written to
<run_dir>/eval/results.json and appear in ``llmzoo-report``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from llmzoo.api import Run, generate_ids, load_run
from llmzoo.shared.decoding import Sampler, StepDecoder
from llmzoo.errors import DataError, UserError

RESULTS = "eval/results.json"
KINDS = ("perplexity", "choice", "generate")


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """The three questions every evaluation asks of a model, batched:
    ``loglikelihood`` of continuations, ``rolling`` log-likelihood of whole documents,
    and greedy ``generate`` until a stop string."""

    def __init__(self, run: Run, batch_size: int = 8, progress: bool = True):
        self.run, self.model, self.tok = run, run.model.eval(), run.tokenizer
        self.batch_size, self.max_len, self.progress = batch_size, run.model.max_seq_len, progress
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the
        continuation) for each (context ids, continuation ids). Inputs longer than the
        context window lose tokens on the left. Longest first, so a batch pads little."""
        out: list[Any] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        for idx in tqdm(batches, desc="log-likelihoods", disable=not self.progress or len(batches) < 2):
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_len + 1):][:-1] for i in idx]
            ids = torch.full((len(rows), max(map(len, rows))), self.tok.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
            logp = self.model(ids.to(self.device)).logits.float().log_softmax(-1).cpu()
            for r, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1])
                lp = logp[r, len(rows[r]) - len(cont):len(rows[r])]
                out[i] = (lp.gather(-1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()))
        return out

    def rolling_pairs(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """A document as disjoint (context, continuation) windows: every token predicted
        once, from <bos> and as many earlier tokens as the context window holds."""
        tokens = [self.tok.bos_id, *ids]
        pairs = []
        for start in range(1, len(tokens), self.max_len):
            end = min(start + self.max_len, len(tokens))
            pairs.append((tokens[max(0, end - 1 - self.max_len):start], tokens[start:end]))
        return pairs

    def rolling(self, docs: Sequence[list[int]]) -> list[float]:
        """Log-likelihood of each whole document."""
        pairs, owner = [], []
        for d, ids in enumerate(docs):
            for p in self.rolling_pairs(ids):
                pairs.append(p)
                owner.append(d)
        sums = [0.0] * len(docs)
        for d, (lp, _) in zip(owner, self.loglikelihood(pairs)):
            sums[d] += lp
        return sums

    def generate(self, contexts: Sequence[list[int]], until: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations, cut before the first stop string (contexts keep their last
        max_len - max_new_tokens tokens)."""
        keep = max(1, self.max_len - max_new_tokens)
        texts = []
        for s in range(0, len(contexts), self.batch_size):
            batch = [list(c)[-keep:] for c in contexts[s:s + self.batch_size]]
            for out in generate_ids(self.run, StepDecoder(Sampler(temperature=0.0)), batch, max_new_tokens=max_new_tokens):
                text = self.tok.decode(out)
                cut = min([text.index(u) for u in until if u and u in text], default=len(text))
                texts.append(text[:cut])
        return texts


# ----------------------------------------------------------------------------- local tasks
@dataclass
class Task:
    """One local task (a node of the ``eval_task`` group)."""

    kind: str
    path: str
    k: int = 0                 # in-context examples (choice, generate)
    seed: int = 0              # which rows become the examples
    limit: int | None = None   # score the first N rows only
    text_field: str = "text"   # perplexity on jsonl
    until: tuple[str, ...] = ("\n",)  # generate: stop strings
    max_new_tokens: int = 16   # generate
    separator: str = "\n\n"    # between in-context examples and the question
    chat: bool = False         # generate: the question as a user turn of the tokenizer's chat template

    def rows(self) -> list[Any]:
        path = Path(self.path)
        if not path.is_file():
            raise DataError(f"eval task file {path}: no such file")
        if path.suffix in (".txt", ".text", ".md"):
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                self._check(rows[-1], path, n)
        return rows

    def _check(self, row: Any, path: Path, n: int) -> None:
        need = {"perplexity": {self.text_field: str}, "choice": {"context": str, "choices": list, "answer": int},
                "generate": {"prompt": str, "answer": str}}[self.kind]
        for key, kind in need.items():
            if not isinstance(row, dict) or not isinstance(row.get(key), kind):
                raise DataError(f"{path}:{n}: a {self.kind} row needs {key!r} ({kind.__name__}); got {row!r:.120}")
        if self.kind == "choice" and not 0 <= row["answer"] < len(row["choices"]):
            raise DataError(f"{path}:{n}: answer={row['answer']} is not an index into its {len(row['choices'])} choices")

    def shots(self, rows: list[dict], i: int) -> str:
        """k solved examples from the other rows, the same ones for every run with this seed."""
        if not self.k:
            return ""
        others = [j for j in range(len(rows)) if j != i]
        picked = random.Random(self.seed * 1_000_003 + i).sample(others, min(self.k, len(others)))
        solved = [r["context"] + r["choices"][r["answer"]] if self.kind == "choice" else r["prompt"] + r["answer"]
                  for r in (rows[j] for j in picked)]
        return self.separator.join(solved) + self.separator

    def run(self, scorer: Scorer) -> dict[str, float]:
        rows = self.rows()
        todo = rows[:self.limit] if self.limit else rows
        if not todo:
            raise DataError(f"eval task file {self.path}: no rows")
        tok = scorer.tok
        if self.kind == "perplexity":
            texts = [r if isinstance(r, str) else r[self.text_field] for r in todo]
            docs = [tok.encode(t) for t in texts]
            nll = -sum(scorer.rolling(docs))
            n_tok, n_bytes = sum(map(len, docs)), sum(len(t.encode("utf-8")) for t in texts)
            return {"perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes,
                    "nll_per_token": nll / n_tok, "documents": len(texts), "tokens": n_tok}
        if self.kind == "choice":
            pairs, spans = [], []
            for i, r in enumerate(todo):
                ctx = tok.encode(self.shots(rows, i) + r["context"])
                spans.append((len(pairs), len(r["choices"])))
                pairs += [(ctx, tok.encode(r["context"] + c)[len(tok.encode(r["context"])):] or [tok.eos_id])
                          for c in r["choices"]]
            scores = [lp for lp, _ in scorer.loglikelihood(pairs)]
            acc = acc_norm = 0
            for r, (s, n) in zip(todo, spans):
                mine = scores[s:s + n]
                normed = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(mine, r["choices"])]
                acc += max(range(n), key=mine.__getitem__) == r["answer"]
                acc_norm += max(range(n), key=normed.__getitem__) == r["answer"]
            return {"acc": acc / len(todo), "acc_norm": acc_norm / len(todo), "questions": len(todo)}
        if self.chat:  # as llmzoo-generate chat=true renders it (instruction-tuned runs)
            from llmzoo.api import prompt_ids

            contexts = prompt_ids(tok, [self.shots(rows, i) + r["prompt"] for i, r in enumerate(todo)], chat=True)
        else:
            contexts = [tok.encode(self.shots(rows, i) + r["prompt"]) for i, r in enumerate(todo)]
        outs = scorer.generate(contexts, list(self.until), self.max_new_tokens)
        hits = sum(o.strip() == r["answer"].strip() for o, r in zip(outs, todo))
        return {"exact_match": hits / len(todo), "questions": len(todo)}


def task_problems(name: str, node: Any) -> list[str]:
    from llmzoo.config import Rule, settings_problems

    if node.get("kind") not in KINDS:
        return [f"eval_task.{name}.kind={node.get('kind')!r} is not one of {list(KINDS)}"]
    if not isinstance(node.get("k", 0), int) or node.get("k", 0) < 0:
        return [f"eval_task.{name}.k={node.get('k')!r}: the number of in-context examples, an integer >= 0"]
    rules = {"seed": Rule(int, 0), "limit": Rule(int, 1, nullable=True), "max_new_tokens": Rule(int, 1),
             "chat": Rule(bool)}  # Task's other numbers, checked before the run is loaded
    return [f"eval_task.{name}.{p}" for p in settings_problems(node, rules, {})]


# ----------------------------------------------------------------------------- the app
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Every chosen local task and lm-eval task on ``cfg.run_dir``; the results are
    written to <run_dir>/eval/results.json (merged with earlier ones) and returned."""
    if not cfg.get("run_dir"):
        raise UserError("give run_dir=<folder of a training run>")
    tasks = {k: v for k, v in (cfg.get("eval_task") or {}).items() if v is not None}
    problems = [p for name, node in tasks.items() for p in task_problems(name, node)]
    if problems:
        raise UserError("invalid eval config:\n  " + "\n  ".join(problems))
    from llmzoo.config import Rule, check_device, check_settings

    check_settings(cfg, {"batch_size": Rule(int, 1), "lm_eval.seed": Rule(int, 0)})
    device = check_device(cfg.get("device")) if cfg.get("device") else None
    run = load_run(cfg.run_dir, cfg.get("checkpoint"))
    if device:
        run = run._replace(model=run.model.to(device))
    scorer = Scorer(run, batch_size=cfg.batch_size)
    results: dict[str, Any] = {}
    for name, node in tasks.items():
        t0 = time.perf_counter()
        spec = OmegaConf.to_container(node, resolve=True)
        spec["until"] = tuple(spec.get("until", ("\n",)))
        results[name] = {**Task(**spec).run(scorer), "k": spec.get("k", 0), "seconds": time.perf_counter() - t0}
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items() if isinstance(v, float)),
              file=sys.stderr)
    lm = cfg.get("lm_eval") or {}
    if lm.get("tasks"):
        results.update(run_lm_eval(run, list(lm.tasks), include_path=lm.get("include_path"),
                                   num_fewshot=lm.get("num_fewshot"), limit=lm.get("limit"),
                                   batch_size=cfg.batch_size, seed=lm.get("seed", 0)))
    out = Path(cfg.run_dir) / RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **results}, indent=2, default=str))
    print(f"[results in {out}]", file=sys.stderr)
    return results


@hydra.main(config_path="pkg://llmzoo_conf", config_name="eval", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from llmzoo.errors import reported

    with reported("llmzoo-eval"):
        evaluate(cfg)


def main() -> None:
    """llmzoo-eval run_dir=<run> [eval_task=[...]] [lm_eval.tasks=[...]] (``--help``)."""
    from llmzoo.cli import hydra_entry

    hydra_entry("llmzoo-eval", _app)


# ----------------------------------------------------------------------------- lm-evaluation-harness
# The model ``llmzoo`` (pip install lm-eval), for any run folder and any block:
#     llmzoo-lm-eval --model llmzoo --model_args run_dir=runs/quickstart --tasks <task> [lm_eval options]
#     llmzoo-eval run_dir=runs/quickstart lm_eval.tasks=[<task>] lm_eval.include_path=<folder of task yaml>
# ``llmzoo-lm-eval`` is lm-eval's own command line with this model registered first: lm-eval 0.4
# finds models only among its own modules (it has no entry-point group), so plain
# ``lm_eval --model llmzoo`` cannot see it. Tokenization of (context, continuation) pairs, rolling
# windows and request ordering are lm-eval's (``TemplateLM``), so the numbers equal ``--model hf``
# on the exported folder (tests/test_evaluation.py).
@functools.cache
def lm_eval_model() -> type:
    """The ``llmzoo`` lm-eval model class, made (and registered) on first use: lm-eval is optional."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    @register_model("llmzoo")
    class LlmzooLM(TemplateLM):
        """model_args: run_dir (required), checkpoint (last | best | a .ckpt), device, batch_size."""

        def __init__(self, run_dir: str | None = None, checkpoint: str | None = None, device: str | None = None,
                     batch_size: int | str = 8, run: Run | None = None, **_: Any):
            super().__init__()
            if run is None:
                if not run_dir:
                    raise ValueError("model_args needs run_dir=<an llmzoo run folder>")
                run = load_run(run_dir, checkpoint)
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's command line asks for cuda by default: stay on the CPU
            if device:
                run = run._replace(model=run.model.to(device))
            self.run = run
            self.scorer = Scorer(run, batch_size=int(batch_size) if str(batch_size).isdigit() else 8, progress=False)
            self.tok = run.tokenizer

        # what TemplateLM needs
        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id

        @property
        def max_length(self) -> int:
            return self.run.model.max_seq_len

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            ids = self.tok.encode(string)
            return [self.tok.bos_id, *ids] if add_special_tokens and getattr(self.tok, "add_bos", False) else ids

        def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
            return self.tok.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            results = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
            for (key, _, _), result in zip(requests, results):
                self.cache_hook.add_partial("loglikelihood", key, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)]
                score = sum(lp for lp, _ in self.scorer.loglikelihood(windows))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
                out.append(score)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in (r.args for r in requests):
                kwargs = dict(gen_kwargs or {})
                until = kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                text = self.scorer.generate([self.tok_encode(context)], until, int(kwargs.get("max_gen_toks", 256)))[0]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

    return LlmzooLM


def run_lm_eval(run: Run, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``run``: {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    result = simple_evaluate(model=lm_eval_model()(run=run, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
                             limit=limit, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    return {f"lm_eval/{task}": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in result["results"].items()}


def lm_eval_main() -> None:
    """``llmzoo-lm-eval``: lm-eval's command line, with ``--model llmzoo`` registered."""
    from lm_eval.__main__ import cli_evaluate

    lm_eval_model()
    cli_evaluate()
