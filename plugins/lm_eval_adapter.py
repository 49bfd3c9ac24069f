"""lm-evaluation-harness model ``llmzoo`` (pip install lm-eval): any run folder, any block.

    llmzoo-lm-eval --model llmzoo --model_args run_dir=runs/quickstart --tasks <task> [lm_eval options]
    llmzoo-eval run_dir=runs/quickstart lm_eval.tasks=[<task>] lm_eval.include_path=<folder of task yaml>

``llmzoo-lm-eval`` is lm-eval's own command line with this model registered first:
lm-eval 0.4 finds models only among its own modules (it has no entry-point group), so
plain ``lm_eval --model llmzoo`` cannot see it. Tokenization of (context, continuation)
pairs, rolling windows and request ordering are lm-eval's (``TemplateLM``), so the
numbers equal ``--model hf`` on the exported folder (tests/test_evaluation.py).
"""

from __future__ import annotations

from typing import Any

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmzoo.api import Run, load_run
from llmzoo_plugins.evaluation import Scorer


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


def run_lm_eval(run: Run, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``run``: {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    result = simple_evaluate(model=LlmzooLM(run=run, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
                             limit=limit, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    return {f"lm_eval/{task}": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in result["results"].items()}


def main() -> None:
    """``llmzoo-lm-eval``: lm-eval's command line, with ``--model llmzoo`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
