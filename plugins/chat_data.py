"""Post-training data (``data=instructions``, ``data=preferences``, ``data=prompts``):
jsonl records, checked line by line, tokenized through the tokenizer's chat template.

  instructions  {"instruction", "input" (optional), "output"}  or  {"messages": [{role, content}, ...]}
                -> input_ids, labels (-100 on everything but the assistant's words)
  preferences   {"prompt", "chosen", "rejected"}
                -> chosen_input_ids / chosen_labels, rejected_input_ids / rejected_labels
  prompts       {"prompt", "answer" (optional, for rule-based rewards)}
                -> prompt_ids (left-padded), prompt_lens, and the answers

``packing`` (instructions): ``document`` packs samples into rows of at most ``seq_len``
tokens, first-fit-decreasing, with ``doc_ids`` so that no sample attends across another's
boundary (the blocks need the ``packed`` capability); ``concat`` packs alike without
boundaries; ``none`` gives each record its own row, right-padded to the longest in its
batch; ``auto`` is document where the stack allows it, else none. Preferences and prompts are padded
(``none`` only: packing pairs is not built yet). Records longer than ``seq_len`` are cut (their
prompt must fit). A bad record stops the run with
``file:line`` and what is wrong, or -- with ``skip_bad_records`` -- is dropped and
reported. Records are small, so they are read into memory (not Hugging Face datasets).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader

from llmzoo.data import DataError, ResumableSampler, data_rank, resolve_files
from llmzoo.interfaces import IGNORE_INDEX, TokenizerExtras

log = logging.getLogger(__name__)

KINDS = {"instructions": None, "preferences": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


def read_records(files: list[str], kind: str, skip_bad: bool) -> list[dict]:
    """Parse and check every line; DataError names file:line (or, skipping, logs them)."""
    records, bad = [], []
    for file in files:
        # Split on b"\n" only: str.splitlines() would also split inside JSON strings at U+2028.
        lines = Path(file).read_bytes().split(b"\n")
        if not any(line.strip() for line in lines):
            raise DataError(f"{file}: empty file")
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
                rec = json.loads(line)
                problem = check_record(rec, kind)
            except UnicodeDecodeError as e:
                problem = f"bytes are not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem:
                if not skip_bad:
                    raise DataError(f"{file}:{n}: {problem} (set data.skip_bad_records=true to drop such records)")
                bad.append(f"{file}:{n}: {problem}")
                continue
            records.append(rec)
    if bad:
        log.warning("dropped %d bad records:\n  %s", len(bad), "\n  ".join(bad[:20]))
    if not records:
        raise DataError(f"no usable {kind} records in {files}")
    return records


ROLES = ("system", "user", "assistant")


def check_record(rec: Any, kind: str) -> str | None:
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if kind == "instructions":
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs:
                return "'messages' must be a non-empty list"
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    return (f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, "
                            f"got {json.dumps(m)[:80]}")
            if not any(m.get("role") == "assistant" for m in msgs):
                return "'messages' has no assistant turn to train on"
            return None
        if "input" in rec and not isinstance(rec["input"], (str, type(None))):
            return f"field 'input' must be a string, got {type(rec['input']).__name__}"
        fields = ("instruction", "output")
    else:
        fields = KINDS[kind]
    for f in fields:
        if not isinstance(rec.get(f), str) or not rec[f]:
            return f"missing or empty string field {f!r} (a {kind} record needs {list(fields)}; has {sorted(rec)})"
        if "\x00" in rec[f]:
            return f"field {f!r} contains a NUL character"
    return None


def _messages(rec: dict) -> list[dict]:
    if "messages" in rec:
        return rec["messages"]
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]], seq_len: int, eos: bool) -> tuple[list[int], list[int]]:
    """(ids, labels) with bos first; labels are -100 on untrained pieces."""
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for text, trained in pieces:
        toks = tokenizer.encode(text)
        ids += toks
        labels += toks if trained else [IGNORE_INDEX] * len(toks)
    if eos:
        ids.append(tokenizer.eos_id), labels.append(tokenizer.eos_id)
    return ids[:seq_len], labels[:seq_len]


def prompt_pieces(tokenizer, prompt: str) -> list[tuple[str, bool]]:
    return tokenizer.render_chat([{"role": "user", "content": prompt}], generation_prompt=True)


def record_texts(tokenizer, rec: dict, kind: str) -> list[str]:
    """The texts ``encode_record`` encodes, piece by piece and rendered in the tokenizer's
    chat format (markers included): what a tokenizer that learns its vocabulary is fitted on."""
    if kind == "instructions":
        pieces = tokenizer.render_chat(_messages(rec))
    else:
        pieces = prompt_pieces(tokenizer, rec["prompt"])
        if kind == "preferences":
            pieces = pieces + [(rec["chosen"], True), (rec["rejected"], True)]
    return [text for text, _ in pieces]


def encode_record(tokenizer, rec: dict, kind: str, seq_len: int) -> dict[str, list[int]] | None:
    if kind == "instructions":
        ids, labels = encode_pieces(tokenizer, tokenizer.render_chat(_messages(rec)), seq_len, eos=True)
        return {"input_ids": ids, "labels": labels} if any(l != IGNORE_INDEX for l in labels) else None
    prompt = prompt_pieces(tokenizer, rec["prompt"])
    if kind == "prompts":
        ids, _ = encode_pieces(tokenizer, prompt, seq_len, eos=False)
        return {"prompt_ids": ids, "answer": rec.get("answer")}
    out = {}
    for side in ("chosen", "rejected"):
        ids, labels = encode_pieces(tokenizer, prompt + [(rec[side], True)], seq_len, eos=True)
        if all(l == IGNORE_INDEX for l in labels):
            return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def pack_first_fit(rows: list[dict], seq_len: int, documents: bool) -> list[dict]:
    """Samples (input_ids, labels) packed into rows of at most ``seq_len`` tokens, longest
    first, each into the first row with room (first-fit-decreasing); with ``documents`` each
    row also gets ``doc_ids`` (0, 1, ... per sample)."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(row["input_ids"])
        at = next((i for i, free in enumerate(room) if free >= n), None)
        if at is None:
            bins.append([]), room.append(seq_len)
            at = len(bins) - 1
        bins[at].append(row)
        room[at] -= n
    packed = []
    for parts in bins:
        out = {k: [t for r in parts for t in r[k]] for k in ("input_ids", "labels")}
        if documents:
            out["doc_ids"] = [d for d, r in enumerate(parts) for _ in r["input_ids"]]
        packed.append(out)
    return packed


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])


PACKINGS = ("auto", "document", "concat", "none")


def packing_problem(kind: str, packing: str) -> list[str]:
    if packing not in PACKINGS:
        return [f"data.packing={packing!r} is not one of {list(PACKINGS)}"]
    if kind != "instructions" and packing != "none":
        return [f"data.packing={packing}: only instruction samples are packed; data.kind={kind} rows are padded "
                "(packing=none)"]
    return []


PROVIDES = {"instructions": frozenset({"input_ids", "labels"}),
            "preferences": frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}),
            "prompts": frozenset({"prompt_ids", "prompt_lens", "answers"})}


class RecordsDataModule(L.LightningDataModule):
    @staticmethod
    def provides_for(node: Any) -> frozenset[str]:
        """The batch fields this module yields for ``data.kind`` (checked against the objective's needs)."""
        return PROVIDES.get(node.get("kind"), frozenset())

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]:
        if node.get("kind") not in KINDS:
            return [f"data.kind={node.get('kind')!r} is not one of {list(KINDS)}"]
        return packing_problem(node.get("kind"), node.get("packing", "none"))

    def __init__(self, tokenizer: Any, *, path: str, kind: str, seq_len: int, batch_size: int = 8,
                 val_fraction: float = 0.05, seed: int = 0, skip_bad_records: bool = False, num_workers: int = 0,
                 work_dir: str | None = None, packing: str = "none"):
        super().__init__()
        if kind not in KINDS:
            raise DataError(f"data.kind={kind!r} is not one of {list(KINDS)}")
        if packing_problem(kind, packing):
            raise DataError(packing_problem(kind, packing)[0])
        self.packing = "none" if packing == "auto" else packing  # auto unresolved: the stack cannot pack
        self.tokenizer, self.path, self.kind, self.seq_len = tokenizer, path, kind, seq_len
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.skip_bad, self.num_workers = skip_bad_records, num_workers
        self.train_rows: list[dict] | None = None
        self.train_sampler: ResumableSampler | None = None

    def texts(self) -> list[str]:
        """The text of every record as the model will see it (``record_texts``): a BPE
        tokenizer trains on it."""
        files, _ = resolve_files(self.path, "jsonl")
        return [t for r in read_records(files, self.kind, self.skip_bad) for t in record_texts(self.tokenizer, r, self.kind)]

    def prepare_data(self) -> None:
        if not TokenizerExtras.of(self.tokenizer).is_trained:
            self.tokenizer.fit(self.texts())

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        files, _ = resolve_files(self.path, "jsonl")
        records = read_records(files, self.kind, self.skip_bad)
        rows = [r for r in (encode_record(self.tokenizer, rec, self.kind, self.seq_len) for rec in records) if r]
        if len(rows) < len(records):
            log.warning("%d records had nothing to train on after cutting to seq_len=%d", len(records) - len(rows),
                        self.seq_len)
        random.Random(self.seed).shuffle(rows)
        n_val = int(len(rows) * self.val_fraction)
        self.val_rows, self.train_rows = rows[:n_val], rows[n_val:]
        if self.packing in ("document", "concat"):
            samples = len(self.train_rows)
            self.train_rows = pack_first_fit(self.train_rows, self.seq_len, self.packing == "document")
            self.val_rows = pack_first_fit(self.val_rows, self.seq_len, self.packing == "document")
            fill = sum(len(r["input_ids"]) for r in self.train_rows) / (self.seq_len * max(1, len(self.train_rows)))
            log.info("packing=%s: %d samples in %d rows of %d tokens (%.0f%% filled)", self.packing, samples,
                     len(self.train_rows), self.seq_len, 100 * fill)
        rank, world = data_rank(self.trainer)
        self.train_sampler = ResumableSampler(len(self.train_rows), self.batch_size, seed=self.seed, rank=rank,
                                              world_size=world)
        log.info("%s: %d train / %d val records from %s", self.kind, len(self.train_rows), len(self.val_rows), self.path)

    def every_batch(self) -> Iterator[dict[str, Any]]:
        """Every training and validation row once, in order (DataModule.every_batch)."""
        rows = list(self.train_rows) + list(self.val_rows)
        for i in range(0, len(rows), self.batch_size):
            yield self.collate(rows[i:i + self.batch_size])

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_id
        if self.kind == "instructions":
            batch = {"input_ids": pad([r["input_ids"] for r in rows], pad_id),
                     "labels": pad([r["labels"] for r in rows], IGNORE_INDEX)}
            if self.packing == "document":  # padding is document -1
                batch["doc_ids"] = pad([r["doc_ids"] for r in rows], -1)
            return batch
        if self.kind == "prompts":
            return {"prompt_ids": pad([r["prompt_ids"] for r in rows], pad_id, left=True),
                    "prompt_lens": torch.tensor([len(r["prompt_ids"]) for r in rows]),
                    "answers": [r["answer"] for r in rows],
                    "input_ids": pad([r["prompt_ids"] for r in rows], pad_id, left=True)}
        batch = {k: pad([r[k] for r in rows], IGNORE_INDEX if k.endswith("labels") else pad_id)
                 for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
        batch["input_ids"] = batch["chosen_input_ids"]  # what the trainer counts tokens on
        return batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_rows, batch_size=self.batch_size, sampler=self.train_sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(self.val_rows, batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)
