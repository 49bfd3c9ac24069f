"""llmzoo-data on datatrove: filters against their published rules on crafted documents,
exact and MinHash dedup on planted duplicates, the same output with 1 and 4 tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import llmzoo

pytest.importorskip("datatrove")
from llmzoo_plugins.data_pipeline import run_pipeline  # noqa: E402

WORDS = ("the of and to in river stone cat found kept walked home night small quiet garden bright morning "
         "children paper window market music letter winter travel simple").split()


def prose(rng: random.Random, n_words: int = 80) -> str:
    """English-like text that passes the Gopher and C4 rules: sentences of 8 words ending in '.'."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences = [" ".join(words[i:i + 8]).capitalize() + "." for i in range(0, n_words, 8)]
    return "\n".join(" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2))


def write(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(docs)))


def kept(out) -> list[str]:
    return sorted(json.loads(line)["text"] for f in (out / "data").glob("*.jsonl")
                  for line in f.read_text().splitlines() if line.strip())


def run(tmp_path, docs, *overrides, name="out"):
    write(tmp_path / "raw" / "docs.jsonl", docs)
    cfg = llmzoo.compose("data_pipeline", [f"input={tmp_path / 'raw'}", f"output={tmp_path / name}", *overrides],
                         validate=False)
    return run_pipeline(cfg)


def test_filters_remove_what_their_rules_say(tmp_path):
    rng = random.Random(0)
    good = [prose(rng) for _ in range(6)]
    long_words = " ".join("".join(rng.choice("abcdefghij") for _ in range(14)) for _ in range(60))
    bad = {
        "length": "Too short.",                                                 # < 5 words
        "gopher_repetition": "\n".join(["The same line is here again and again."] * 20),  # duplicate lines
        "gopher_quality": long_words + ".",                                     # mean word length 14 > 10
        "c4": "lorem ipsum " + prose(rng),                                      # C4 drops lorem ipsum pages
        "bad_words": prose(rng) + "\nThe zorblax was in the small quiet garden today.",
    }
    words = tmp_path / "bad.txt"
    words.write_text("zorblax\n")
    report = run(tmp_path, [*good, *bad.values()], "filter=[length,gopher_repetition,gopher_quality,c4,bad_words]",
                 f"filter.bad_words.path={words}", "dedup=none")
    assert kept(tmp_path / "out") == sorted(good)
    removed = {name: r["removed_documents"] for name, r in report["removed"].items()}
    assert removed == {"length": 1, "gopher_repetition": 1, "gopher_quality": 1, "c4": 1, "bad_words": 1}
    # each removal is kept as an example, with the document
    example = json.loads((tmp_path / "out" / "removed" / "length").glob("*.jsonl").__next__().read_text())
    assert example["text"] == "Too short."


def test_shared_spacy_tokenizer_gives_datatroves_tokens_and_sentences(tmp_path):
    """The one-pass tokenizer the filters share answers exactly as datatrove's spaCy
    tokenizer does, across memory-zone renewals and after pickling (as executors do), and
    build_filters gives it to datatrove's filters."""
    import pickle

    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    from llmzoo_plugins.data_pipeline import SharedSpacyTokenizer, build_filters

    rng = random.Random(7)
    texts = [prose(rng, 40) for _ in range(6)] + [
        "Dr. Smith's cat (aged 3) didn't eat -- it's 5:30 p.m.! Why? U.S.A. e-mail: a@b.com...",
        "  leading and trailing spaces \n\n and blank lines.\n", "", "one", "Émile naïve café. Ünïcode words?"]
    reference, ours = SpaCyTokenizer("en"), SharedSpacyTokenizer("en", renew_every=2)
    for tok in (ours, pickle.loads(pickle.dumps(ours))):
        for t in texts + texts[::-1]:  # repeats hit the one-document memo; the zone renews every 2
            assert tok.word_tokenize(t) == reference.word_tokenize(t), t
            assert tok.span_tokenize(t) == reference.span_tokenize(t), t
            assert tok.sent_tokenize(t) == reference.sent_tokenize(t), t
    cfg = llmzoo.compose("data_pipeline", ["filter=[length,gopher_repetition,gopher_quality,c4]", "input=x",
                                           "output=y"], validate=False)
    steps = build_filters(cfg, tmp_path)
    shared = [s.language for s in steps if hasattr(s, "language")]
    assert len(shared) == 3 and all(s is shared[0] for s in shared) and isinstance(shared[0], SharedSpacyTokenizer)


def test_exact_dedup_keeps_one_copy_of_each_text(tmp_path):
    rng = random.Random(1)
    unique = [prose(rng) for _ in range(5)]
    docs = unique + [unique[0], unique[0], unique[2].upper(), "  ".join(unique[3].split(" "))]  # case and spaces
    report = run(tmp_path, docs, "filter=[]", "dedup=exact")
    assert kept(tmp_path / "out") == sorted(unique)
    assert report["removed"]["dedup"]["removed_documents"] == 4


def test_minhash_finds_near_duplicates_and_keeps_unrelated_documents(tmp_path):
    """20 originals of 200 words, each with one near copy (3 words changed: Jaccard of 5-grams
    ~0.86) and 20 unrelated documents: recall and precision of the removals are measured."""
    rng = random.Random(2)
    originals = [prose(rng, 200) for _ in range(20)]
    copies = []
    for t in originals:
        words = t.split(" ")
        for i in rng.sample(range(len(words)), 3):
            words[i] = "changed"
        copies.append(" ".join(words))
    unrelated = [prose(rng, 200) for _ in range(20)]
    report = run(tmp_path, [*originals, *copies, *unrelated], "filter=[]", "dedup=minhash")
    out = set(kept(tmp_path / "out"))
    pairs_caught = sum((a in out) != (b in out) for a, b in zip(originals, copies))  # exactly one of each pair kept
    recall = pairs_caught / len(originals)
    wrongly_removed = sum(t not in out for t in unrelated)
    precision = pairs_caught / max(1, pairs_caught + wrongly_removed)
    assert recall >= 0.95 and precision == 1.0, (recall, precision)
    assert report["removed"]["dedup"]["removed_documents"] == pairs_caught


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_one_and_four_tasks_give_the_same_output(tmp_path, workers):
    rng = random.Random(3)
    docs = [prose(rng) for _ in range(30)] + ["short"] * 3
    docs += docs[:5]  # duplicates across the input
    for name, tasks in (("one", 1), ("four", 4)):
        folder = tmp_path / f"raw_{name}"
        for k in range(4):  # four input files, so four tasks each get one
            write(folder / f"part{k}.jsonl", docs[k::4])
        cfg = llmzoo.compose("data_pipeline", [f"input={folder}", f"output={tmp_path / name}", "dedup=exact",
                                               "filter=[length]", f"executor.tasks={tasks}",
                                               f"executor.workers={min(tasks, workers)}"], validate=False)
        run_pipeline(cfg)
    assert kept(tmp_path / "one") == kept(tmp_path / "four") and len(kept(tmp_path / "one")) == 30


@pytest.mark.slow
def test_ray_executor_gives_the_local_output(tmp_path):
    """executor=ray (a local Ray started by the run) with 4 tasks: the same documents as one
    local task. Slow: starting Ray takes seconds."""
    pytest.importorskip("ray")
    import ray

    rng = random.Random(5)
    docs = [prose(rng) for _ in range(20)] + ["short"] * 2 + [prose(random.Random(5))]  # one duplicate
    for name, executor in (("local", ["executor=local"]), ("ray", ["executor=ray", "executor.tasks=4"])):
        folder = tmp_path / f"raw_{name}"
        for k in range(4):
            write(folder / f"part{k}.jsonl", docs[k::4])
        cfg = llmzoo.compose("data_pipeline", [f"input={folder}", f"output={tmp_path / name}", "dedup=exact",
                                               "filter=[length]", *executor], validate=False)
        try:
            run_pipeline(cfg)
        finally:
            if name == "ray":
                ray.shutdown()
    assert kept(tmp_path / "ray") == kept(tmp_path / "local") and len(kept(tmp_path / "local")) == 20


def test_the_cleaned_data_trains(tmp_path):
    rng = random.Random(4)
    run(tmp_path, [prose(rng) for _ in range(40)], "filter=[length]", "dedup=exact")
    cfg = llmzoo.compose(overrides=["model=tiny", f"data.path={tmp_path / 'out' / 'data'}", "data.format=jsonl",
                                    "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_every=0",
                                    "logger=[]", "sample.prompts=[]", "trainer.enable_progress_bar=false",
                                    f"run_dir={tmp_path / 'run'}"])
    assert llmzoo.train(cfg)["step"] == 2


def test_decontamination_removes_every_planted_leak_and_nothing_else(tmp_path):
    rng = random.Random(5)
    evals = tmp_path / "eval.jsonl"
    questions = [prose(rng, 30) for _ in range(5)]
    evals.write_text("".join(json.dumps({"question": q, "choices": ["a b", "zeta omega"], "answer": 0}) + "\n"
                             for q in questions))
    clean = [prose(rng, 60) for _ in range(10)]
    leaks = [clean[0] + "\n" + questions[1][:120], prose(rng, 40) + "\n" + questions[3],
             prose(rng, 60) + "\nThe answer was zeta omega."]  # a short item (2 words) appearing whole
    run(tmp_path, [*clean, *leaks], "filter=[decontaminate]", f"filter.decontaminate.paths=[{evals}]",
        "filter.decontaminate.n=13", "dedup=none")
    assert kept(tmp_path / "out") == sorted(clean)


def test_report_counts_tokens_with_a_runs_tokenizer(tmp_path, single_process_run):
    from llmzoo.api import load_run

    rng = random.Random(5)
    docs = [prose(rng) for _ in range(4)] + ["Too short."]
    report = run(tmp_path, docs, "filter=[length]", "dedup=none", f"tokens={single_process_run}",
                 f"tokenize={single_process_run}")
    tok = load_run(single_process_run).tokenizer
    assert report["kept_tokens"] == sum(len(tok.encode(t)) for t in docs[:4])
    # tokenize=: the kept documents as token shards (each document ends with eos), counted per shard
    shards = report["token_shards"]
    assert shards["tokens"] == sum(s["tokens"] for s in shards["shards"]) == report["kept_tokens"] + 4
    assert [s["documents"] for s in shards["shards"]] == [4] and Path(shards["path"], "index.json").is_file()
    assert report["removed"]["length"]["removed_tokens"] == len(tok.encode("Too short."))
    assert run(tmp_path, docs, "filter=[length]", "dedup=none", name="bytes")["kept_tokens"] == \
        sum(len(t.encode()) for t in docs[:4])


FOREIGN = {  # our own sentences, a few lines each
    "fr": "Le chat dort sur la chaise pendant que la pluie tombe sur le jardin. Nous avons mangé du pain "
          "avec du fromage et bu un peu de vin rouge. Demain matin, les enfants iront à l'école avec leurs amis.",
    "de": "Der Hund schläft unter dem Tisch, während es draußen regnet. Wir haben gestern Brot mit Käse "
          "gegessen und ein Glas Wasser getrunken. Morgen früh gehen die Kinder mit ihren Freunden zur Schule.",
    "es": "El gato duerme en la silla mientras la lluvia cae sobre el jardín. Comimos pan con queso y "
          "bebimos un poco de vino tinto. Mañana por la mañana los niños irán a la escuela con sus amigos.",
}


@pytest.mark.parametrize("languages,keep", [("[en]", {"en"}), ("[en,fr]", {"en", "fr"})])
def test_language_filter_keeps_the_listed_languages(tmp_path, languages, keep):
    pytest.importorskip("langdetect")
    rng = random.Random(1)
    english = [prose(rng) for _ in range(4)]
    docs = english + list(FOREIGN.values())
    report = run(tmp_path, docs, "filter=[language]", f"filter.language.languages={languages}", "dedup=none")
    want = english + [t for lang, t in FOREIGN.items() if lang in keep]
    assert kept(tmp_path / "out") == sorted(want)
    assert report["removed"]["language"]["removed_documents"] == 3 - len(keep - {"en"})
    rows = [json.loads(line) for f in (tmp_path / "out" / "data").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {r["metadata"]["language"] for r in rows} == keep and all(r["metadata"]["language_score"] >= 0.65 for r in rows)


def test_language_filter_refuses_an_unknown_language(tmp_path):
    pytest.importorskip("langdetect")
    from llmzoo.errors import UserError
    from llmzoo_plugins.data_pipeline import LanguageFilter

    with pytest.raises(UserError, match=r"\['xx'\].*langdetect knows.*'en'"):
        LanguageFilter(languages=["en", "xx"])


# ----------------------------------------------------------------------------- never lose a user's file
def test_output_equal_to_or_inside_the_input_is_refused_and_nothing_is_deleted(tmp_path):
    from llmzoo.errors import UserError

    rng = random.Random(0)
    raw = tmp_path / "raw"
    write(raw / "docs.jsonl", [prose(rng) for _ in range(5)])
    (raw / "data").mkdir()
    (raw / "data" / "mine.txt").write_text("the user's own file")
    for output, why in [(raw, "is the input folder"), (raw / "clean", "inside input=")]:
        for overwrite in ("false", "true"):
            cfg = llmzoo.compose("data_pipeline", [f"input={raw}", f"output={output}", f"overwrite={overwrite}"],
                                 validate=False)
            with pytest.raises(UserError, match=why):
                run_pipeline(cfg)
    # a folder holding a data/ that llmzoo-data did not write: refused even with overwrite=true
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "keep.txt").write_text("keep me")
    cfg = llmzoo.compose("data_pipeline", [f"input={raw}", f"output={other}", "overwrite=true"], validate=False)
    with pytest.raises(UserError, match="which llmzoo-data did not write"):
        run_pipeline(cfg)
    assert (raw / "data" / "mine.txt").read_text() == "the user's own file"
    assert (other / "data" / "keep.txt").read_text() == "keep me"
    # its own result, with the marker, is replaced on overwrite=true; a file of the user's beside it stays
    out = tmp_path / "out"
    report = run(tmp_path, [prose(rng) for _ in range(5)], "dedup=none", "filter=[]")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a result"):
        run(tmp_path, [prose(rng) for _ in range(5)], "dedup=none", "filter=[]")
    again = run(tmp_path, [prose(rng) for _ in range(3)], "dedup=none", "filter=[]", "overwrite=true")
    assert report["kept_documents"] == 5 and again["kept_documents"] == 3 and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("docs,overrides,message", [
    ([], [], "no document to process"),
    (["{not json"], [], r"1 malformed lines.*docs\.jsonl:1: not a JSON object"),
    (None, ["text_field=body"], "0 malformed lines, 3 without a string 'body' field"),
    (None, ["filter=[length]", "filter.length.min_words=100000"], r"no document is left after the filters \(removed: \{'length': 3\}"),
    (None, ["executor.tasks=0"], r"executor\.tasks=0: must be a whole number >= 1"),
    (None, ["executor.workers=0"], r"executor\.workers=0: must be a whole number >= 1 \(or -1\)"),
    (None, ["input_format=xml"], r"input_format='xml' is not one of \['jsonl', 'parquet'\]"),
    (None, ["dedup.bands=0"], r"dedup\.bands=0"),
    (None, ["dedup.rows=two"], r"dedup\.rows='two'"),
])
def test_inputs_and_settings_that_give_nothing_are_one_message(tmp_path, docs, overrides, message):
    from llmzoo.errors import UserError

    raw = tmp_path / "raw" / "docs.jsonl"
    raw.parent.mkdir(parents=True)
    if docs is None:
        write(raw, [prose(random.Random(i)) for i in range(3)])
    else:
        raw.write_text("".join(d + "\n" for d in docs))
    cfg = llmzoo.compose("data_pipeline", [f"input={raw.parent}", f"output={tmp_path / 'out'}", "dedup=minhash",
                                           *overrides], validate=False)
    with pytest.raises(UserError, match=message):
        run_pipeline(cfg)


def test_malformed_lines_are_counted_and_said(tmp_path, capsys):
    rng = random.Random(0)
    raw = tmp_path / "raw" / "docs.jsonl"
    write(raw, [prose(rng) for _ in range(4)])
    with open(raw, "a") as fh:
        fh.write("{broken\n" + json.dumps({"body": "no text"}) + "\n")
    cfg = llmzoo.compose("data_pipeline", [f"input={raw.parent}", f"output={tmp_path / 'out'}", "dedup=none",
                                           "filter=[]"], validate=False)
    report = run_pipeline(cfg)
    assert report["input"]["documents"] == 4 and report["input"]["malformed_lines"] == 1
    assert report["input"]["without_text"] == 1 and report["kept_documents"] == 4
    assert "1 malformed lines and 1 documents without a string 'text' field are skipped" in capsys.readouterr().err


def test_an_interrupted_run_resumes_and_gives_the_uninterrupted_output(tmp_path, monkeypatch):
    """Killed after its filter stage, the same command again resumes: datatrove skips the
    tasks it completed, the output equals one uninterrupted run's, and only a finished run
    "holds a result" (other settings on the unfinished folder are refused, not mixed in)."""
    import datatrove.executor.local as local

    from llmzoo.errors import UserError
    from llmzoo_plugins.data_pipeline import MARKER

    rng = random.Random(5)
    docs = [prose(rng) for _ in range(20)] + ["short"] * 3
    docs += docs[:4]
    for k in range(2):
        write(tmp_path / "raw" / f"part{k}.jsonl", docs[k::2])
    args = [f"input={tmp_path / 'raw'}", "dedup=exact", "filter=[length]", "executor.tasks=2"]
    straight = llmzoo.compose("data_pipeline", [*args, f"output={tmp_path / 'straight'}"], validate=False)
    run_pipeline(straight)

    cfg = llmzoo.compose("data_pipeline", [*args, f"output={tmp_path / 'out'}"], validate=False)
    real_run, stages = local.LocalPipelineExecutor.run, []

    def killed_after_the_filter(self):
        stages.append(self.logging_dir.path)
        if "2_exact" in self.logging_dir.path:
            raise KeyboardInterrupt  # as a Ctrl-C between two stages
        return real_run(self)

    monkeypatch.setattr(local.LocalPipelineExecutor, "run", killed_after_the_filter)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    assert json.loads((tmp_path / "out" / MARKER).read_text())["finished"] is False
    filtered = {f: f.stat().st_mtime_ns for f in (tmp_path / "out" / "filtered").glob("*.jsonl")}
    assert len(filtered) == 2
    other = llmzoo.compose("data_pipeline", [*args, f"output={tmp_path / 'out'}", "filter=[]"], validate=False)
    with pytest.raises(UserError, match="an unfinished run with other settings"):
        run_pipeline(other)

    monkeypatch.setattr(local.LocalPipelineExecutor, "run", real_run)
    report = run_pipeline(cfg)
    assert report["resumed"] is True and kept(tmp_path / "out") == kept(tmp_path / "straight")
    assert {f: f.stat().st_mtime_ns for f in filtered} == filtered  # the finished filter tasks were skipped
    assert len(kept(tmp_path / "straight")) == 20
    assert json.loads((tmp_path / "out" / MARKER).read_text())["finished"] is True
    with pytest.raises(UserError, match="already holds a result"):  # finished: a re-run is refused again
        run_pipeline(cfg)
