"""Training data: local text / jsonl / parquet files -> Hugging Face ``datasets`` ->
tokenized (cached ``map``) -> packed into fixed-length sequences -> train/val loaders.

Bad input stops with the file and line at fault, or -- with ``skip_bad_records`` --
the bad records are dropped and counted, never silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .errors import DataError  # noqa: F401 - plugins import it from here
from .interfaces import IGNORE_INDEX, Tokenizer, TokenizerExtras, TrainableTokenizer
from .shared.files import (FORMATS, SAVED, ScanReport, all_formats, check_files, is_saved_dataset,  # noqa: F401
                           load_saved_dataset, plugin_formats, resolve_files, text_column)  # shared with the plugins' data modules; here: old home
from .shared.chat import ChatTemplate  # noqa: F401 - its old home
from .shared.sampling import ResumableSampler, data_rank  # noqa: F401 - shared with the plugins' data modules

log = logging.getLogger(__name__)


def _read_records(fmt: str, files: list[str], skip_bad: bool, options: dict, stamp: Any) -> Iterator[dict]:
    """``datasets.Dataset.from_generator``'s generator for plugin formats (``stamp`` only keys the cache)."""
    reader = plugin_formats()[fmt][1]
    for f in files:
        for record in reader(f, skip_bad, [], **options):
            yield {"text": record["text"]}


# ----------------------------------------------------------------------------- the data module
PACKINGS = ("auto", "document", "concat", "none")


class TextDataModule(L.LightningDataModule):
    """Tokenized language-modelling data. Batches are dicts with ``input_ids`` and ``labels``
    (B, seq_len); documents end with the tokenizer's eos (and start with its bos when the
    tokenizer's ``add_bos`` says so). ``packing``: ``concat`` joins them into rows of seq_len
    tokens; ``document`` makes the same rows and adds ``doc_ids`` (B, seq_len), so attention and
    recurrent states stay inside each document and no document's first token is a target;
    ``none`` gives each document its own row, cut to seq_len and padded; ``auto`` (resolved
    before the run, ``llmzoo.config.packing_of``) is document where the stack allows it, else concat."""

    provides = frozenset({"input_ids", "labels"})

    def __init__(self, tokenizer: Tokenizer, *, path: str, format: str | None = "auto", text_field: str = "text",
                 seq_len: int = 128, batch_size: int = 16, val_fraction: float = 0.05, max_val_sequences: int = 256,
                 num_workers: int = 0, skip_bad_records: bool = False, cache_dir: str | None = None,
                 sample_by: str = "line", seed: int = 0, work_dir: str | None = None,
                 format_options: dict | None = None, packing: str = "concat"):
        super().__init__()
        if packing not in PACKINGS:
            raise DataError(f"data.packing={packing!r} is not one of {list(PACKINGS)}")
        self.packing = "concat" if packing == "auto" else packing
        self.tokenizer = tokenizer
        self.path, self.format, self.text_field, self.seq_len = path, format, text_field, seq_len
        self.batch_size, self.val_fraction, self.max_val_sequences = batch_size, val_fraction, max_val_sequences
        self.num_workers, self.skip_bad_records, self.cache_dir = num_workers, skip_bad_records, cache_dir
        self.sample_by, self.seed, self.format_options = sample_by, seed, format_options or {}
        self.work_dir = Path(work_dir or ".")
        self.train_ds: Any = None  # datasets.Dataset once setup() ran
        self.val_ds: Any = None
        self.train_sampler: ResumableSampler | None = None

    # raw records -------------------------------------------------------------
    def load_raw(self):
        import datasets

        if os.environ.get("CI"):
            datasets.disable_progress_bars()
        if self.format == SAVED or (self.format in (None, "auto") and is_saved_dataset(self.path)):
            return load_saved_dataset(self.path, self.text_field, self.skip_bad_records, self.cache_dir)
        files, fmt = resolve_files(self.path, self.format)
        if fmt in plugin_formats():
            return self._load_plugin_format(files, fmt)
        if self.format_options:
            raise DataError(f"data.format_options={dict(self.format_options)}: format {fmt!r} takes no options")
        files = check_files(files, fmt, self.text_field, self.skip_bad_records, self.work_dir / "clean_data")
        if fmt == "arrow":
            ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=self.cache_dir)
            return text_column(ds, self.text_field, files[0], self.skip_bad_records, self.path)
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=self.cache_dir,
                                       sample_by=self.sample_by)
            field_ = "text"
        else:
            ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files, split="train",
                                       cache_dir=self.cache_dir)
            field_ = self.text_field
        ds = ds.select_columns([field_]).rename_column(field_, "text") if field_ != "text" else ds.select_columns(["text"])
        ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True, desc="dropping empty records")
        if len(ds) == 0:
            raise DataError(f"data.path={self.path!r}: every record is empty")
        return ds

    def _load_plugin_format(self, files: list[str], fmt: str):
        """Records from a plugin's reader (``llmzoo_data_formats``), read once to check them,
        then cached by datasets under a key that changes with the files' sizes and times."""
        import datasets

        reader = plugin_formats()[fmt][1]
        options = dict(self.format_options or {})
        bad: list[str] = []
        try:
            count = sum(1 for f in files for _ in reader(f, self.skip_bad_records, bad, **options))
        except TypeError as e:
            raise DataError(f"data.format_options={options}: not options of format {fmt!r} ({e})") from None
        if bad:
            log.warning("skipped %d bad records: %s", len(bad), "; ".join(bad[:10]))
        if count == 0:
            raise DataError(f"data.path={self.path!r}: no usable {fmt} records")
        stamp = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
        ds = datasets.Dataset.from_generator(_read_records, cache_dir=self.cache_dir, gen_kwargs={
            "fmt": fmt, "files": files, "skip_bad": self.skip_bad_records, "options": options, "stamp": stamp})
        return ds.select_columns(["text"])

    def prepare_data(self) -> None:  # called on rank 0 only: fills the datasets cache
        if self.train_ds is None:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is None:
            self._build()
        rank, world = data_rank(getattr(self, "trainer", None))
        self.train_sampler = ResumableSampler(len(self.train_ds), self.batch_size, seed=self.seed,
                                              rank=rank, world_size=world)

    def _build(self) -> None:
        raw = self.load_raw()
        if not TokenizerExtras.of(self.tokenizer).is_trained:
            log.info("training the tokenizer on %d records", len(raw))
            cast(TrainableTokenizer, self.tokenizer).fit(raw["text"])
        n_val = 0 if self.val_fraction <= 0 or len(raw) < 2 else max(1, int(len(raw) * self.val_fraction))
        split = raw.train_test_split(test_size=n_val, seed=self.seed, shuffle=True) if n_val else {"train": raw}
        self.train_ds = self._pack(split["train"], "train")
        self.val_ds = self._pack(split["test"], "val") if n_val else None
        if self.val_ds is not None and len(self.val_ds) > self.max_val_sequences:
            self.val_ds = self.val_ds.select(range(self.max_val_sequences))
        if self.val_ds is not None and len(self.val_ds) == 0:
            self.val_ds = None

    def _pack(self, ds, name: str):
        tok, eos, L_ = self.tokenizer, self.tokenizer.eos_id, self.seq_len
        extras = TokenizerExtras.of(tok)
        encode_batch = extras.encode_batch or (lambda texts: [tok.encode(t) for t in texts])
        bos = [tok.bos_id] if extras.add_bos else []  # as the tokenizer says (add_bos_token)

        def tokenize(batch):
            return {"ids": [bos + ids + [eos] for ids in encode_batch(batch["text"])]}

        def pack(batch):
            if self.packing == "none":
                return {"input_ids": [ids[:L_] for ids in batch["ids"]]}
            flat = [i for ids in batch["ids"] for i in ids]
            n = len(flat) // L_
            rows = {"input_ids": [flat[k * L_:(k + 1) * L_] for k in range(n)]}
            if self.packing == "document":
                doc = [d for d, ids in enumerate(batch["ids"]) for _ in ids]
                rows["doc_ids"] = [doc[k * L_:(k + 1) * L_] for k in range(n)]
            return rows

        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {name}")
        ds = ds.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"packing {name}")
        if len(ds) == 0:
            raise DataError(f"data.path={self.path!r}: the {name} split has fewer than data.seq_len={L_} tokens")
        return ds.with_format("torch")

    # loaders -------------------------------------------------------------------
    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.packing == "none":  # padded to the longest row, padding never a target
            lens = torch.tensor([len(r["input_ids"]) for r in rows])
            ids = torch.full((len(rows), int(lens.max())), self.tokenizer.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :lens[i]] = r["input_ids"]
            keep = torch.arange(ids.shape[1]) < lens[:, None]
            return {"input_ids": ids, "labels": ids.masked_fill(~keep, IGNORE_INDEX)}
        ids = torch.stack([r["input_ids"] for r in rows]).long()
        if self.packing != "document":
            return {"input_ids": ids, "labels": ids}
        doc = torch.stack([r["doc_ids"] for r in rows]).long()
        starts = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)  # a document's first token: no target
        return {"input_ids": ids, "labels": ids.masked_fill(starts, IGNORE_INDEX), "doc_ids": doc}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=self.batch_size, sampler=self.train_sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_ds is None:
            return []
        return DataLoader(self.val_ds, batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)
