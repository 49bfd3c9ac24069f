"""Evaluation: our scorer against direct computations, the local tasks against brute-force
answers, and the lm-eval ``llmzoo`` model against lm-eval's ``hf`` model on the same
weights (the exported folder)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llmzoo
from llmzoo_plugins.evaluation import Scorer, Task, evaluate

STEPS = ["trainer.max_steps=30", "trainer.val_every=0", "trainer.enable_progress_bar=false", "logger=[]",
         "sample.prompts=[]", "data.seq_len=64", "data.batch_size=8", "model.max_seq_len=64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    llmzoo.train(llmzoo.compose(overrides=["model=tiny", f"run_dir={out}", *STEPS]))
    return out


def _direct_logprob(model, ids: list[int], start: int, first: int = 0) -> float:
    """sum over j >= start of log p(ids[j] | ids[first:j]), one forward per token."""
    total = 0.0
    with torch.no_grad():
        for j in range(start, len(ids)):
            total += model(torch.tensor([ids[first:j]])).logits[0, -1].log_softmax(-1)[ids[j]].item()
    return total


def _pair_logprob(model, ctx: list[int], cont: list[int], window: int = 64) -> float:
    """What lm-eval asks: one input of at most `window` tokens ending before the last token."""
    ids = ctx + cont
    return _direct_logprob(model, ids, len(ctx), first=max(0, len(ids) - 1 - window))


def test_loglikelihood_and_rolling_equal_direct_computation(run_dir):
    run = llmzoo.load_run(run_dir)
    scorer = Scorer(run, batch_size=3, progress=False)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (m,), generator=g).tolist())
             for n, m in ((5, 3), (1, 7), (80, 4), (12, 1), (30, 30))]
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (lp, _) in zip(pairs, got):
        assert lp == pytest.approx(_pair_logprob(run.model, ctx, cont), abs=1e-4)
    # a document of 150 tokens (+ <bos>): tokens 1-64, 65-128 and 129-150 predicted by three
    # windows of 64 inputs -- the last one reaching back as far as it can
    doc = torch.randint(0, 256, (150,), generator=g).tolist()
    tokens = [run.tokenizer.bos_id, *doc]
    want = (_direct_logprob(run.model, tokens[:65], 1) + _direct_logprob(run.model, tokens[:129], 65, first=64)
            + _direct_logprob(run.model, tokens, 129, first=150 - 64))
    (rolled,) = scorer.rolling([doc])
    assert rolled == pytest.approx(want, abs=1e-3)


def test_local_tasks_score_what_brute_force_says(run_dir, tmp_path):
    run = llmzoo.load_run(run_dir)
    scorer = Scorer(run, progress=False)
    rows = [{"context": f"{a} + {b} =", "choices": [f" {a + b}.", f" {a + b + 1}.", f" {a - b}."], "answer": i % 3}
            for i, (a, b) in enumerate([(3, 4), (10, 20), (7, 7), (31, 2), (5, 9), (40, 1)])]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Task(kind="choice", path=str(path), k=2, seed=3)
    result = task.run(scorer)
    tok, correct = run.tokenizer, 0
    for i, r in enumerate(rows):
        shots = task.shots(rows, i)
        assert shots.count("\n\n") == 2 and r["context"] not in shots  # k others, never the question itself
        ctx = tok.encode(shots + r["context"])
        lps = [_pair_logprob(run.model, ctx, tok.encode(c)) for c in r["choices"]]
        correct += max(range(3), key=lps.__getitem__) == r["answer"]
    assert result["acc"] == correct / len(rows)
    assert task.shots(rows, 0) == Task(kind="choice", path=str(path), k=2, seed=3).shots(rows, 0)
    # k-shot generation: the exact-match count of greedy continuations
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": r["context"], "answer": r["choices"][0]}) + "\n" for r in rows))
    gen = Task(kind="generate", path=str(qa), k=3, max_new_tokens=6).run(scorer)
    outs = llmzoo.generate(run, None, [Task(kind="generate", path=str(qa), k=3).shots(
        [json.loads(x) for x in qa.read_text().splitlines()], i) + r["context"] for i, r in enumerate(rows)],
        max_new_tokens=6)
    hits = sum(o.split("\n")[0].strip() == r["choices"][0].strip() for o, r in zip(outs, rows))
    assert gen["exact_match"] == hits / len(rows)


def test_llmzoo_eval_writes_results_for_the_bundled_tasks(run_dir):
    cfg = llmzoo.compose("eval", [f"run_dir={run_dir}", "eval_task.stories_perplexity.limit=10",
                                  "eval_task.arith_choice.limit=20", "eval_task.arith_kshot.limit=10"], validate=False)
    results = evaluate(cfg)
    stored = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(stored) >= {"stories_perplexity", "arith_choice", "arith_kshot"}
    ppl = results["stories_perplexity"]
    assert math.isclose(ppl["bits_per_byte"] * math.log(2) * 1.0, ppl["nll_per_token"] * ppl["tokens"] /
                        sum(len(x.encode()) for x in open(cfg.eval_task.stories_perplexity.path).read().splitlines()[:10]),
                        rel_tol=1e-9)
    assert 1 < ppl["perplexity"] < 259  # trained 30 steps on similar stories: better than uniform over bytes
    assert 0 <= results["arith_choice"]["acc"] <= 1 and results["arith_kshot"]["k"] == 4
    # llmzoo-report shows them for the sweep's runs
    from llmzoo_plugins.report import main as report

    sweep = run_dir.parent / "sweep"
    sweep.mkdir(exist_ok=True)
    (sweep / "summary.json").write_text(json.dumps([{"run_dir": str(run_dir), "status": "ok", "overrides": []}]))
    assert report([str(sweep), "--no-plots"]) == 0
    text = (sweep / "report.md").read_text()
    assert "## Evaluation" in text and f"{ppl['bits_per_byte']:.4g}" in text


def test_lm_eval_llmzoo_model_equals_the_hf_model_on_the_export(run_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmzoo_plugins.hf_io import export_hf
    from llmzoo_plugins.evaluation import lm_eval_model

    run = llmzoo.load_run(run_dir)
    exported = export_hf(run, tmp_path / "hf")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} + {b} =", "choices": [f" {a + b}.", f" {a + b + 2}."], "label": 0})
                            + "\n" for a, b in [(1, 2), (12, 30), (5, 5), (21, 8), (9, 40), (3, 33)]))
    stories = tmp_path / "stories.jsonl"
    stories.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                               open(llmzoo.compose("eval", validate=False).eval_task.stories_perplexity.path).read().splitlines()[:4]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(f"""task: llmzoo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (tasks / "ppl.yaml").write_text(f"""task: llmzoo_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {stories}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    manager = TaskManager(include_path=str(tasks))
    kw = dict(tasks=["llmzoo_mc", "llmzoo_ppl"], task_manager=manager, log_samples=True)
    ours = simple_evaluate(model=lm_eval_model()(run=run, batch_size=4), **kw)
    theirs = simple_evaluate(model=HFLM(pretrained=str(exported), device="cpu", batch_size=4), **kw)
    assert ours["results"]["llmzoo_mc"]["acc,none"] == theirs["results"]["llmzoo_mc"]["acc,none"]
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["llmzoo_ppl"][key] == pytest.approx(theirs["results"]["llmzoo_ppl"][key], rel=1e-5)
    for a, b in zip(ours["samples"]["llmzoo_mc"], theirs["samples"]["llmzoo_mc"]):
        for (lp_a, _), (lp_b, _) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert float(lp_a) == pytest.approx(float(lp_b), abs=1e-4)
