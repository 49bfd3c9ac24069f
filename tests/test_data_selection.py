"""llmzoo-data select=: DSIR importance resampling and reference-model perplexity, each
against its formula computed independently here, and the selection stage's bookkeeping."""

from __future__ import annotations

import json
import math
import random
import zlib

import pytest
import torch

import llmzoo

pytest.importorskip("datatrove")
from llmzoo_plugins.data_pipeline import how_many, run_pipeline  # noqa: E402
from llmzoo_plugins.data_selection import ImportanceResampler, PerplexitySelector  # noqa: E402

BIO = "protein enzyme amino acid codon gene ribosome membrane cell sequence binding".split()
SPORT = "football goal match referee striker league stadium season coach team".split()


def sentences(rng, vocab, n=40):
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


def test_dsir_log_weights_are_the_formula_and_selection_follows_the_target(tmp_path):
    rng = random.Random(0)
    pool = [sentences(rng, BIO) for _ in range(30)] + [sentences(rng, SPORT) for _ in range(30)]
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": sentences(rng, BIO)}) + "\n" for _ in range(20)))
    sel = ImportanceResampler(str(target), target_docs=30, buckets=257, seed=3)

    def grams(t):  # the features, written out again: lower-case word unigrams and bigrams, crc32 buckets
        w = t.lower().replace(".", "").split()
        return [zlib.crc32(g.encode()) % 257 for g in w + [f"{a} {b}" for a, b in zip(w, w[1:])]]

    def log_p(texts):
        c = [1.0] * 257
        for t in texts:
            for g in grams(t):
                c[g] += 1
        return [math.log(x / sum(c)) for x in c]

    tgt = [json.loads(line)["text"] for line in target.read_text().splitlines()]
    lt, lr = log_p(tgt), log_p(pool)
    expected = [sum(lt[g] - lr[g] for g in grams(t)) for t in pool]
    assert sel.log_weights(pool) == pytest.approx(expected, rel=1e-9)
    scores = sel.scores(pool)
    chosen = sorted(range(60), key=lambda i: -scores[i])[:30]
    assert sum(i < 30 for i in chosen) >= 29  # the biology half
    assert sel.scores(pool) == scores  # seeded
    assert ImportanceResampler(str(target), target_docs=30, buckets=257, seed=4).scores(pool) != scores


def test_perplexity_scores_equal_one_document_at_a_time_and_keep_the_likeliest(single_process_run):
    sel = PerplexitySelector(str(single_process_run), fraction=0.5, batch_size=3, max_tokens=40)
    run = llmzoo.load_run(single_process_run)
    texts = ["Once upon a time there was a fox.", "zq xv kj qq zz", "The little cat sat on the mat and slept.",
             "1234 5678 9012", "A", "She walked home in the quiet night."]
    ppl = sel.perplexities(texts)
    assert math.isnan(ppl[4]) and sel.scores(texts)[4] == -math.inf  # "A": one token, nothing to score
    for text, p in zip(texts[:4] + texts[5:], ppl[:4] + ppl[5:]):  # the reference: one forward per document
        ids = torch.tensor([sel.encode(text)])
        with torch.no_grad():
            logp = torch.log_softmax(run.model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None]).mean()
        assert p == pytest.approx(math.exp(nll.item()), rel=1e-5)
    keep = sorted((i for i in range(6) if i != 4), key=lambda i: ppl[i])[:3]
    assert sorted(range(6), key=lambda i: -sel.scores(texts)[i])[:3] == keep


def test_selection_stage_keeps_the_target_count_and_records_the_rest(tmp_path):
    rng = random.Random(1)
    docs = [sentences(rng, BIO) for _ in range(10)] + [sentences(rng, SPORT) for _ in range(10)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "target.txt").write_text(" ".join(sentences(rng, BIO) for _ in range(5)))
    cfg = llmzoo.compose("data_pipeline", [f"input={tmp_path / 'raw'}", f"output={tmp_path / 'out'}", "filter=[]",
                                           "dedup=none", "select=dsir", f"select.target={tmp_path / 'target.txt'}",
                                           "select.target_docs=10"], validate=False)
    report = run_pipeline(cfg)
    kept = [json.loads(line)["text"] for f in (tmp_path / "out" / "data").glob("*.jsonl")
            for line in f.read_text().splitlines() if line.strip()]
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed" / "select" / "00000.jsonl").read_text()
               .splitlines()]
    assert len(kept) == 10 and sorted(kept + [r["text"] for r in removed]) == sorted(docs)
    assert sum(t in docs[:10] for t in kept) >= 9
    assert all(r["metadata"]["filter_reason"] == "select" for r in removed)
    assert report["select"]["kept"] == 10 and report["removed"]["select"]["removed_documents"] == 10


def test_how_many_and_bad_options():
    from llmzoo.errors import UserError

    assert how_many(10, 3, 0.5) == 3 and how_many(10, None, 0.25) == 2 and how_many(4, 9, None) == 4
    for bad in ((None, None), (None, 1.5), (-1, None)):
        with pytest.raises(UserError):
            how_many(10, *bad)
    with pytest.raises(UserError, match="keep"):
        PerplexitySelector("x", keep="middle")
