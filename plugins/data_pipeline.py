"""``llmzoo-data``: raw documents -> filtered, deduplicated jsonl that ``llmzoo-train
data.path=<output>/data`` reads. Built on datatrove (pip install "datatrove[processing]"):
its readers, its C4 and Gopher filters, its exact and MinHash deduplication and its
executors; llmzoo adds length, bad-words and decontamination filters and the report.

Stages, each a datatrove pipeline run by the configured executor (``executor=local`` with
``tasks`` x ``workers``, or ``executor=slurm`` / ``executor=ray`` on a cluster):
  1. read ``input`` -> every ``filter`` in order -> <output>/filtered/  (each filter writes
     the documents it removes to <output>/removed/<filter>/, with the reason)
  2. ``dedup=exact`` (hash of the normalised text) or ``dedup=minhash`` (n-gram MinHash,
     bands x rows) over the filtered documents -> <output>/data/ ; ``dedup=none`` copies.
The report (<output>/report.json, printed as a table) counts documents and characters
kept and removed by each step, and the duplicate clusters found.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from llmzoo.errors import UserError

try:  # datatrove is optional: llmzoo-data says how to install it
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError:  # pragma: no cover - exercised without datatrove installed
    BaseFilter, Document, WordTokenizer = object, Any, object


# ----------------------------------------------------------------------------- llmzoo's own filters
class LengthFilter(BaseFilter):
    """Keeps documents with ``min_words`` <= words <= ``max_words`` (null: no bound)."""

    name = "📏 length"

    def __init__(self, min_words: int = 0, max_words: int | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_words, self.max_words = min_words, max_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.split())
        if n < self.min_words:
            return False, "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return False, "too_many_words"
        return True


class BadWordsFilter(BaseFilter):
    """Removes documents holding any word or phrase listed in ``path`` (one per line,
    matched case-insensitively on word boundaries), as C4's "bad words" list does."""

    name = "🚫 bad words"

    def __init__(self, path: str, exclusion_writer=None):
        super().__init__(exclusion_writer)
        words = [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines() if w.strip()]
        if not words:
            raise UserError(f"filter.bad_words.path={path}: the word list is empty")
        self.pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return (False, "bad_word") if self.pattern.search(doc.text) else True


class DecontaminationFilter(BaseFilter):
    """Removes training documents that share a word ``n``-gram with an evaluation set (the
    GPT-3 paper's 13-gram overlap test), so evaluation measures more than memory. ``paths``:
    jsonl files (every string field of a row, lists of strings included, counts as text) or
    .txt files (a line each); an item shorter than ``n`` words counts when it appears whole."""

    name = "🧪 decontamination"

    def __init__(self, paths: list[str], n: int = 13, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.n, self.grams, self.short = n, set(), set()
        for path in paths:
            for text in _eval_texts(Path(path)):
                words = _words(text)
                if len(words) >= n:
                    self.grams.update(zip(*(words[i:] for i in range(n))))
                elif words:
                    self.short.add(tuple(words))
        self.short_lengths = sorted({len(w) for w in self.short})
        if not self.grams and not self.short:
            raise UserError(f"filter.decontaminate.paths={paths}: no evaluation text found")

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = _words(doc.text)
        if any(g in self.grams for g in zip(*(words[i:] for i in range(self.n)))):
            return False, "eval_ngram"
        for k in self.short_lengths:
            if any(g in self.short for g in zip(*(words[i:] for i in range(k)))):
                return False, "eval_item"
        return True


class LanguageFilter(BaseFilter):
    """Keeps documents whose most likely language is one of ``languages`` (ISO 639-1 codes)
    with probability >= ``threshold``, as RefinedWeb / FineWeb do with fastText's language
    id. That model has to be downloaded, so this filter uses ``langdetect`` (a port of
    Google's language-detection: character n-gram profiles of 55 languages that ship inside
    the package as JSON -- nothing is fetched or unpickled), seeded so that runs repeat.
    The detected language and its probability go into the document's metadata."""

    name = "🌍 language"

    def __init__(self, languages: list[str] | str = "en", threshold: float = 0.65, exclusion_writer=None):
        super().__init__(exclusion_writer)
        try:
            from langdetect.detector_factory import PROFILES_DIRECTORY
        except ImportError:
            raise UserError('filter=language needs langdetect: pip install "llmzoo[data]"') from None
        self.languages = [languages] if isinstance(languages, str) else list(languages)
        known = sorted(p.name for p in Path(PROFILES_DIRECTORY).iterdir())
        unknown = sorted(set(self.languages) - set(known))
        if unknown or not self.languages:
            raise UserError(f"filter.language.languages={self.languages}: {unknown or 'none given'}; "
                            f"langdetect knows {known}")
        if not 0 <= threshold <= 1:
            raise UserError(f"filter.language.threshold must be in [0, 1], got {threshold}")
        self.threshold, self._factory = threshold, None  # the profiles load in the worker, once

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
        from langdetect.lang_detect_exception import LangDetectException

        if self._factory is None:
            self._factory = DetectorFactory()
            self._factory.load_profile(PROFILES_DIRECTORY)
            self._factory.set_seed(0)  # langdetect samples n-grams at random: the same answer every run
        detector = self._factory.create()
        detector.append(doc.text)
        try:
            best = detector.get_probabilities()[0]
        except (LangDetectException, IndexError):  # no letters at all
            return False, "language_unknown"
        doc.metadata["language"], doc.metadata["language_score"] = best.lang, round(best.prob, 4)
        if best.lang not in self.languages:
            return False, f"language_{best.lang}"
        return True if best.prob >= self.threshold else (False, "language_below_threshold")


def ray_executor(address: str | None = None, **kwargs: Any):
    """datatrove's ``RayPipelineExecutor`` (``executor=ray``) once Ray is up: ``ray.init``
    joins the cluster at ``address`` (null: ``RAY_ADDRESS``, else a local Ray started for
    this run, on this machine's cores). The other keys are the executor's own."""
    try:
        import ray
    except ImportError:
        raise UserError('executor=ray needs Ray: pip install "llmzoo[ray]"') from None
    from datatrove.executor import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return RayPipelineExecutor(**kwargs)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _eval_texts(path: Path):
    if not path.is_file():
        raise UserError(f"filter.decontaminate.paths: {path}: no such file")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            yield line
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        for v in (row.values() if isinstance(row, dict) else [row]):
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, str):
                    yield t


# ----------------------------------------------------------------------------- one spaCy pass per document
class SharedSpacyTokenizer(WordTokenizer):
    """datatrove's spaCy word tokenizer for ``language``, giving the same tokens and sentence
    spans at about 6x the speed (measured on English; benchmarks/data_pipeline.py):

    - the Gopher filters ask for a document's words and C4 for its sentences; datatrove runs
      spaCy once for each, this runs it once and answers both from the one parse;
    - datatrove wraps every call in a spaCy memory zone, so every word of every document is a
      new lexeme; this keeps one zone open for ``renew_every`` documents, which bounds memory
      the same way.

    ``build_filters`` hands one instance to every datatrove filter and to MinHash through
    their ``language`` argument, which datatrove accepts as a tokenizer."""

    def __init__(self, language: str = "en", renew_every: int = 1000):
        super().__init__(language)
        from datatrove.utils.word_tokenizers import SpaCyTokenizer

        self.renew_every = renew_every
        self._reference = SpaCyTokenizer(language)  # its blank pipeline with the sentencizer
        self._zone, self._docs, self._last = None, 0, (None, [], [])

    def __getstate__(self) -> dict:  # executors pickle the pipeline; the parse does not travel
        return {"language": self.language, "renew_every": self.renew_every}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _parse(self, text: str) -> tuple[list[str], list[tuple[int, int]]]:
        if self._last[0] == text:
            return self._last[1], self._last[2]
        from datatrove.utils.word_tokenizers import strip_strings

        nlp = self._reference.tokenizer
        if self._zone is None or self._docs >= self.renew_every:
            if self._zone is not None:
                self._zone.__exit__(None, None, None)
            self._zone, self._docs = nlp.memory_zone(), 0
            self._zone.__enter__()
        self._docs += 1
        nlp.max_length = len(text) + 10
        try:
            doc = nlp(text, disable=["parser", "tagger", "ner"])
        except Exception:  # the inputs spaCy chokes on: datatrove's own workaround, in its own zone
            self._zone.__exit__(None, None, None)
            self._zone = None
            words, spans = self._reference.word_tokenize(text), self._reference.span_tokenize(text)
        else:
            words = strip_strings([t.text for t in doc])
            spans = [(s.start_char, s.end_char) for s in doc.sents]
        self._last = (text, words, spans)
        return words, spans

    def word_tokenize(self, text: str) -> list[str]:
        return self._parse(text)[0]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self._parse(text)[1]

    def sent_tokenize(self, text: str) -> list[str]:
        from datatrove.utils.word_tokenizers import strip_strings

        return strip_strings([text[a:b] for a, b in self._parse(text)[1]])


def shared_tokenizer(language: Any):
    """The one ``SharedSpacyTokenizer`` of this process for ``language`` where datatrove
    tokenizes that language with spaCy (not Japanese, which it cuts into chunks); else
    ``language`` unchanged."""
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

    if not isinstance(language, str) or language == "ja":
        return language
    try:
        if not isinstance(load_word_tokenizer(language), SpaCyTokenizer):
            return language
    except (ValueError, ImportError):
        return language
    if language not in _SHARED:
        _SHARED[language] = SharedSpacyTokenizer(language)
    return _SHARED[language]


_SHARED: dict[str, SharedSpacyTokenizer] = {}


# ----------------------------------------------------------------------------- the pipeline
def _reader(cfg: DictConfig, folder: str, glob: str | None = None):
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    if cfg.get("input_format", "jsonl") == "parquet":
        return ParquetReader(folder, text_key=cfg.text_field, glob_pattern=glob or "*.parquet")
    return JsonlReader(folder, text_key=cfg.text_field, glob_pattern=glob or cfg.get("input_glob") or "*.jsonl*")


def _writer(folder: Path):
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


def build_filters(cfg: DictConfig, out: Path) -> list:
    from hydra.utils import instantiate

    steps = []
    for name, node in (cfg.get("filter") or {}).items():
        if node is not None:
            steps.append(instantiate(node, exclusion_writer=_writer(out / "removed" / name), _convert_="all"))
    for step in steps:  # datatrove's own filters tokenize by self.language and nothing else
        if type(step).__module__.startswith("datatrove.pipeline.filters.") and hasattr(step, "language"):
            step.language = shared_tokenizer(step.language)
    return steps


# What an llmzoo-data run writes into its output folder, and the marker that says so:
# overwrite=true removes these names only, and only where the marker is.
WRITTEN = ("filtered", "removed", "dedup", "data", "logs", "tokens", "report.json")
MARKER = ".llmzoo-data.json"
INPUT_FORMATS = ("jsonl", "parquet")


DEDUP_KINDS = ("none", "exact", "minhash")


def check_pipeline_config(cfg: DictConfig) -> None:
    """Every setting a user may mistype, checked before any work (one message each)."""
    def whole(key: str, value: Any, low: int, also: tuple = ()) -> None:
        if value in also:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            extra = f" (or {', '.join(map(str, also))})" if also else ""
            raise UserError(f"{key}={value!r}: must be a whole number >= {low}{extra}")

    from llmzoo.config import node_problems

    problems = node_problems(cfg)  # every filter, dedup, select and executor node against its class
    if problems:
        raise UserError("invalid llmzoo-data config:\n  - " + "\n  - ".join(problems))
    if cfg.get("input_format", "jsonl") not in INPUT_FORMATS:
        raise UserError(f"input_format={cfg.get('input_format')!r} is not one of {list(INPUT_FORMATS)}")
    if not isinstance(cfg.get("text_field"), str) or not cfg.text_field:
        raise UserError(f"text_field={cfg.get('text_field')!r}: must be the name of the documents' text field")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise UserError(f"overwrite={cfg.get('overwrite')!r}: must be true or false")
    ex = cfg.executor
    if "tasks" in ex:
        whole("executor.tasks", ex.tasks, 1)
    if "workers" in ex:
        whole("executor.workers", ex.workers, 1, also=(-1,))
    d = cfg.get("dedup")
    if d is not None and d.get("kind") not in DEDUP_KINDS:
        raise UserError(f"dedup.kind={d.get('kind')!r} is not one of {list(DEDUP_KINDS)}")
    if d is not None and d.get("kind") == "minhash":
        for key in ("n_grams", "bands", "rows"):
            whole(f"dedup.{key}", d.get(key), 1)
        whole("dedup.seed", d.get("seed"), 0)


def settings_key(cfg: DictConfig) -> str:
    """What makes two llmzoo-data runs the same run: every setting but ``overwrite``."""
    import hashlib

    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("overwrite", "hydra")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_folder(src: Path, out: Path, overwrite: bool, key: str | None = None) -> bool:
    """The output is not the input, not inside it (its files would be read as input next
    time) and does not hold it; a result already there is replaced only with
    ``overwrite=true`` and only where a previous llmzoo-data run left its marker, and
    then only the names it writes (``WRITTEN``). True when the folder holds an unfinished
    run of the same settings (``key``): it resumes, datatrove skipping the tasks it finished."""
    folder = (src if src.is_dir() else src.parent).resolve()
    o = out.resolve()
    if o == folder or (src.is_dir() and folder in o.parents):
        raise UserError(f"output={out} is {'the input folder' if o == folder else 'inside input=' + str(src)}: "
                        "choose an output folder outside the input")
    if o in src.resolve().parents:
        raise UserError(f"input={src} is inside output={out}: choose an output folder that does not hold the input")
    found = [n for n in WRITTEN if (out / n).exists()]
    if not found:
        return False
    if not (out / MARKER).is_file():
        raise UserError(f"output={out} already holds {found}, which llmzoo-data did not write (no {MARKER}): "
                        "choose another folder; llmzoo-data never deletes files it did not write")
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    unfinished = marker.get("finished") is False
    if unfinished and key is not None and marker.get("settings") == key and not overwrite:
        print(f"llmzoo-data: resuming the unfinished run in {out} (its completed tasks are skipped)", file=sys.stderr)
        return True
    if not overwrite:
        raise UserError(f"output={out} already holds " + ("an unfinished run with other settings" if unfinished
                                                         else "a result") + ": choose another folder or overwrite=true")
    for n in found:  # datatrove would skip the tasks it finds completed
        p = out / n
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return False


def scan_input(src: Path, text_field: str, glob: str | None) -> dict[str, Any]:
    """One pass over local jsonl input: documents, malformed lines and documents without a
    string ``text_field`` (what datatrove's reader would drop with only a log line)."""
    files = [src] if src.is_file() else sorted(p for p in src.rglob(glob or "*.jsonl*") if p.is_file())
    scan: dict[str, Any] = {"files": len(files), "documents": 0, "malformed_lines": 0, "without_text": 0,
                            "first_problem": None}
    for f in files:
        if f.suffix not in (".jsonl", ".json") and not f.name.endswith(".jsonl"):
            continue  # compressed input: datatrove reads it, the scan does not
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    scan["malformed_lines"] += 1
                    scan["first_problem"] = scan["first_problem"] or f"{f}:{n}: not a JSON object"
                    continue
                if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
                    scan["without_text"] += 1
                    scan["first_problem"] = scan["first_problem"] or f"{f}:{n}: no string field {text_field!r}"
                    continue
                scan["documents"] += 1
    return scan


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """All stages of ``cfg`` (conf/data_pipeline.yaml); returns (and writes) the report."""
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise UserError('llmzoo-data needs datatrove: pip install "datatrove[processing]"') from None
    from hydra.utils import instantiate

    check_pipeline_config(cfg)
    src = Path(str(cfg.input))
    if not src.exists():
        raise UserError(f"input={src}: no such file or folder")
    counter = token_counter(cfg.get("tokens", "byte"))  # checked before any work
    if cfg.get("tokenize"):
        run_tokenizer("tokenize", cfg.tokenize)
    folder, glob = (str(src.parent), src.name) if src.is_file() else (str(src), None)
    out = Path(str(cfg.output))
    key = settings_key(cfg)
    resumed = check_output_folder(src, out, bool(cfg.get("overwrite")), key)
    scan = None
    if cfg.get("input_format", "jsonl") == "jsonl" and str(cfg.executor._target_).endswith("LocalPipelineExecutor"):
        scan = scan_input(src, cfg.text_field, glob or cfg.get("input_glob"))
        if scan["documents"] == 0:
            why = (f"{scan['files']} files matched" if scan["files"] else "no file matched "
                   f"{glob or cfg.get('input_glob') or '*.jsonl*'}")
            raise UserError(f"input={src}: no document to process ({why}; {scan['malformed_lines']} malformed lines, "
                            f"{scan['without_text']} without a string {cfg.text_field!r} field"
                            + (f"; first: {scan['first_problem']}" if scan["first_problem"] else "") + ")")
        if scan["malformed_lines"] or scan["without_text"]:
            print(f"llmzoo-data: warning: {scan['malformed_lines']} malformed lines and {scan['without_text']} "
                  f"documents without a string {cfg.text_field!r} field are skipped (first: {scan['first_problem']})",
                  file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": "llmzoo-data", "names": list(WRITTEN), "input": str(src.resolve()), "settings": key}
    (out / MARKER).write_text(json.dumps({**marker, "finished": False}))  # a kill leaves a run to resume
    logs = out / "logs"

    def execute(stage: str, pipeline: list, tasks: int | None = None) -> Any:
        node = cfg.executor
        kw = {"tasks": tasks} if tasks is not None else {}
        return instantiate(node, pipeline=pipeline, logging_dir=str(logs / stage), **kw).run()

    execute("1_filter", [_reader(cfg, folder, glob), *build_filters(cfg, out), _writer(out / "filtered")])
    if not any(f.stat().st_size for f in (out / "filtered").glob("*.jsonl")):
        removed = {k: v["removed_documents"] for k, v in make_report(out, counter)["removed"].items()}
        raise UserError(f"no document is left after the filters (removed: {removed or 'none'}; no document read "
                        f"from input={src} if that is empty): loosen filter=[...]; what each removed is in "
                        f"{out / 'removed'}/<filter>/")
    kind = cfg.dedup.kind if cfg.get("dedup") else "none"
    filtered = lambda: _reader(cfg, str(out / "filtered"), "*.jsonl")  # noqa: E731 - the same split in every stage
    if kind == "exact":
        from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                          ExactFindDedups)

        conf = ExactDedupConfig(content_getter=normalise)
        execute("2_exact_signatures", [filtered(), ExactDedupSignature(str(out / "dedup" / "sigs"), conf)])
        execute("3_exact_find", [ExactFindDedups(str(out / "dedup" / "sigs"), str(out / "dedup" / "dups"), conf,
                                                 save_cluster_size=True)], tasks=1)
        execute("4_exact_filter", [filtered(), ExactDedupFilter(str(out / "dedup" / "dups"), conf,
                                                                 exclusion_writer=_writer(out / "removed" / "dedup")),
                                   _writer(out / "data")])
    elif kind == "minhash":
        from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                      MinhashDedupFilter, MinhashDedupSignature)
        from datatrove.utils.hashing import HashConfig

        d = cfg.dedup
        conf = MinhashConfig(n_grams=d.n_grams, num_buckets=d.bands, hashes_per_bucket=d.rows, seed=d.seed,
                             hash_config=HashConfig(precision=64))
        signatures = MinhashDedupSignature(str(out / "dedup" / "sigs"), conf)
        signatures.word_tokenizer = shared_tokenizer(signatures.language)
        execute("2_minhash_signatures", [filtered(), signatures])
        execute("3_minhash_buckets", [MinhashDedupBuckets(str(out / "dedup" / "sigs"), str(out / "dedup" / "buckets"),
                                                          config=conf)], tasks=d.bands)
        execute("4_minhash_clusters", [MinhashDedupCluster(str(out / "dedup" / "buckets"), str(out / "dedup" / "dups"),
                                                           config=conf, save_cluster_size=True)], tasks=1)
        execute("5_minhash_filter", [filtered(), MinhashDedupFilter(str(out / "dedup" / "dups"),
                                                                     exclusion_writer=_writer(out / "removed" / "dedup")),
                                     _writer(out / "data")])
    elif kind == "none":
        execute("2_copy", [filtered(), _writer(out / "data")])
    else:
        raise UserError(f"dedup.kind={kind!r} is not one of {list(DEDUP_KINDS)}")
    selected = None
    if cfg.get("select"):  # global: over everything the stages kept
        selected = run_selection(instantiate(cfg.select, _convert_="all"), out / "data", out / "removed" / "select")
    report = make_report(out, counter)
    if selected:
        report["select"] = selected
    if scan is not None:
        report["input"] = scan
    if resumed:
        report["resumed"] = True
    if cfg.get("tokenize"):
        report["token_shards"] = write_shards(out, cfg.tokenize)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / MARKER).write_text(json.dumps({**marker, "finished": True}))  # only now does it hold a result
    return report


# ----------------------------------------------------------------------------- selection
def how_many(n: int, target_docs: int | None, fraction: float | None) -> int:
    """How many of ``n`` documents a selector keeps: ``target_docs`` when given, else the ``fraction``."""
    if target_docs is None and fraction is None:
        raise UserError("select: give select.target_docs (a count) or select.fraction (0..1)")
    if fraction is not None and not 0 <= fraction <= 1:
        raise UserError(f"select.fraction={fraction!r} must be in [0, 1]")
    if target_docs is not None and target_docs < 0:
        raise UserError(f"select.target_docs={target_docs!r} must be >= 0")
    return min(n, target_docs) if target_docs is not None else round(n * fraction)


def run_selection(selector, data: Path, removed: Path, text_field: str = "text") -> dict:
    """Keep the ``how_many`` highest-scoring documents of ``data/*.jsonl`` (rewritten in
    place, order kept); the others, with their score, go to ``removed/``."""
    files = sorted(data.glob("*.jsonl"))
    rows = [(f, json.loads(line)) for f in files for line in f.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    scores = selector.scores([r[text_field] for _, r in rows])
    k = how_many(len(rows), selector.target_docs, selector.fraction)
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], i))
    chosen = set(order[:k])
    kept: dict[Path, list[str]] = {f: [] for f in files}
    dropped = []
    for i, (f, r) in enumerate(rows):
        if i in chosen:
            kept[f].append(json.dumps(r))
        else:
            meta = {**r.get("metadata", {}), "filter_reason": "select", "select_score": scores[i]}
            dropped.append(json.dumps({**r, "metadata": meta}))
    for f, lines in kept.items():
        f.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    removed.mkdir(parents=True, exist_ok=True)
    (removed / "00000.jsonl").write_text("".join(line + "\n" for line in dropped), encoding="utf-8")
    return {"candidates": len(rows), "kept": k, "score_of_last_kept": scores[order[k - 1]] if k else None}


def normalise(doc: Document) -> str:
    """What exact dedup compares: lower case, runs of white space made one space."""
    return " ".join(doc.text.lower().split())


def run_tokenizer(key: str, spec: Any) -> tuple[str, Any]:
    """(name, tokenizer) of a run folder, or of a tokenizer option (``byte``) that needs no training."""
    from omegaconf import OmegaConf

    from llmzoo.api import CONFIG_FILE, TOKENIZER_DIR, check_stored_config
    from hydra.utils import instantiate

    from llmzoo.config import conf_docs, target_class
    from llmzoo.interfaces import TokenizerExtras

    run = Path(str(spec))
    if (run / CONFIG_FILE).exists() and (run / TOKENIZER_DIR).is_dir():
        cfg = check_stored_config(OmegaConf.load(run / CONFIG_FILE), run / CONFIG_FILE)
        tok = target_class(cfg.tokenizer).load(str(run / TOKENIZER_DIR))
        return f"{cfg.tokenizer._target_.rsplit('.', 1)[-1]} of {run}", tok
    if "/" not in str(spec):
        node = next((d.doc for d in conf_docs() if d.group == "tokenizer" and d.name == str(spec)), None)
        try:
            tok = instantiate(OmegaConf.create(node), _convert_="all") if node is not None else None
        except Exception:  # noqa: BLE001 - an option that needs more than its own node: said below
            tok = None
        if tok is not None and TokenizerExtras.of(tok).is_trained:
            return f"tokenizer={spec}", tok
    raise UserError(f"{key}={spec}: not a run folder (no {CONFIG_FILE} and {TOKENIZER_DIR}/) nor a tokenizer option "
                    "that needs no training; give an llmzoo run folder or e.g. byte")


def token_counter(tokens: str | None):
    """(name, text -> token count) for the report: ``byte`` counts UTF-8 bytes (the tokens
    of ``tokenizer=byte``); a run folder counts with that run's tokenizer."""
    if tokens in (None, "byte"):
        return "byte", lambda text: len(text.encode("utf-8"))
    name, tok = run_tokenizer("tokens", tokens)
    return name, lambda text: len(tok.encode(text))


def write_shards(out: Path, spec: Any) -> dict[str, Any]:
    """The kept documents (out/data) as token shards in out/tokens (``tokenize=``), with their counts."""
    import shutil

    from llmzoo.shared.tokens import write_token_shards

    name, tok = run_tokenizer("tokenize", spec)
    files = sorted((out / "data").glob("*.jsonl"))
    texts = (json.loads(line)["text"] for f in files for line in f.read_text(encoding="utf-8").splitlines()
             if line.strip())
    if (out / "tokens").exists():
        shutil.rmtree(out / "tokens")  # a resumed or repeated run writes them anew
    index = write_token_shards(texts, tok, out / "tokens")
    return {"path": str(out / "tokens"), "tokenizer": name, "tokens": sum(s["n_tokens"] for s in index["shards"]),
            "shards": [{"file": s["tokens"], "tokens": s["n_tokens"], "documents": s["n_docs"]}
                       for s in index["shards"]]}


def make_report(out: Path, counter=None) -> dict[str, Any]:
    """Documents in, kept and removed (with their characters and tokens, counted by
    ``counter`` from ``token_counter``) for each filter, the dedup and the selection."""
    name, n_tokens = counter or token_counter("byte")

    def count(folder: Path) -> dict[str, int]:
        c = {"documents": 0, "characters": 0, "tokens": 0}
        for f in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    text = json.loads(line)["text"]
                    c["documents"] += 1
                    c["characters"] += len(text)
                    c["tokens"] += n_tokens(text)
        return c

    steps = {}
    for folder in sorted((out / "removed").iterdir()) if (out / "removed").exists() else []:
        steps[folder.name] = {f"removed_{k}": v for k, v in count(folder).items()}
    kept = count(out / "data")
    return {**{f"kept_{k}": v for k, v in kept.items()}, "tokens_counted_with": name, "removed": steps,
            "data": str(out / "data"), "examples_of_removals": str(out / "removed")}


@hydra.main(config_path="pkg://llmzoo_conf", config_name="data_pipeline", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from llmzoo.errors import reported

    with reported("llmzoo-data"):
        if cfg.get("input") is None or cfg.get("output") is None:
            raise UserError("give input=<jsonl file or folder> and output=<folder>")
        report = run_pipeline(cfg)
        print(f"kept {report['kept_documents']} documents ({report['kept_characters']} characters, "
              f"{report['kept_tokens']} tokens) in {report['data']}")
        for name, r in report["removed"].items():
            print(f"  {name:>20}: removed {r['removed_documents']} documents ({r['removed_characters']} characters, "
                  f"{r['removed_tokens']} tokens)")
        print(f"tokens counted with: {report['tokens_counted_with']}")
        if "token_shards" in report:
            t = report["token_shards"]
            print(f"token shards ({t['tokenizer']}): {t['tokens']} tokens in {len(t['shards'])} shards, "
                  + ", ".join(f"{s['file']} {s['tokens']}" for s in t["shards"][:8]))
            print(f"train on them: llmzoo-train data=tokens data.path={t['path']}", file=sys.stderr)
        else:
            print(f"train on it: llmzoo-train data.path={report['data']} data.format=jsonl", file=sys.stderr)


def main() -> None:
    """llmzoo-data input=<raw> output=<folder> [filter=[...]] [dedup=exact|minhash|none] [executor.tasks=N]"""
    from llmzoo.cli import hydra_entry

    hydra_entry("llmzoo-data", _app)

