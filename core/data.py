"""Training data: local text / jsonl / parquet files -> Hugging Face ``datasets`` ->
tokenized (cached ``map``) -> packed into fixed-length sequences -> train/val loaders.

Bad input stops with the file and line at fault, or -- with ``skip_bad_records`` --
the bad records are dropped and counted, never silently.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, cast

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from .errors import DataError  # noqa: F401 - plugins import it from here
from .interfaces import Tokenizer, TokenizerExtras, TrainableTokenizer
from .shared.files import (FORMATS, SAVED, ScanReport, all_formats, check_files, is_saved_dataset,  # noqa: F401
                           plugin_formats, resolve_files)  # shared with the plugins' data modules; here: old home
from .shared.chat import ChatTemplate  # noqa: F401 - its old home

log = logging.getLogger(__name__)


def _read_records(fmt: str, files: list[str], skip_bad: bool, options: dict, stamp: Any) -> Iterator[dict]:
    """``datasets.Dataset.from_generator``'s generator for plugin formats (``stamp`` only keys the cache)."""
    reader = plugin_formats()[fmt][1]
    for f in files:
        for record in reader(f, skip_bad, [], **options):
            yield {"text": record["text"]}


# ----------------------------------------------------------------------------- sampling
def data_rank(trainer: Any) -> tuple[int, int]:
    """(this process's data rank, number of data ranks): the data-parallel ones. The
    processes of one tensor-parallel or pipeline group share a rank: same batches."""
    if trainer is None:
        return 0, 1
    kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kw.get("rank", trainer.global_rank)), int(kw.get("num_replicas", trainer.world_size))


class ResumableSampler(Sampler[int]):
    """Shuffles with seed + epoch, splits across ranks, and can start mid-epoch.

    Each epoch uses the same number of samples on every rank (a whole number of
    global batches); ``start_batch`` skips the batches a resumed run already saw.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.epoch_offset = 0  # the data epoch minus Lightning's epoch counter (set on resume)
        self.per_rank = (n // (batch_size * world_size)) * batch_size
        if self.per_rank == 0:
            raise DataError(f"only {n} sequences: fewer than one global batch of "
                            f"{batch_size} x {world_size} processes; lower data.batch_size or data.seq_len")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch + self.epoch_offset

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[: self.per_rank * self.world_size][self.rank:: self.world_size]
        start, self.start_batch = self.start_batch * self.batch_size, 0
        return iter(mine[start:].tolist())

    def __len__(self) -> int:
        return self.per_rank


# ----------------------------------------------------------------------------- the data module
class TextDataModule(L.LightningDataModule):
    """Tokenized, packed language-modelling data. Batches are dicts with ``input_ids``
    and ``labels`` (B, seq_len); documents are joined with the tokenizer's eos (and
    start with its bos when the tokenizer's ``add_bos`` says so)."""

    provides = frozenset({"input_ids", "labels"})

    def __init__(self, tokenizer: Tokenizer, *, path: str, format: str | None = "auto", text_field: str = "text",
                 seq_len: int = 128, batch_size: int = 16, val_fraction: float = 0.05, max_val_sequences: int = 256,
                 num_workers: int = 0, skip_bad_records: bool = False, cache_dir: str | None = None,
                 sample_by: str = "line", seed: int = 0, work_dir: str | None = None,
                 format_options: dict | None = None):
        super().__init__()
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
            return self._load_saved()
        files, fmt = resolve_files(self.path, self.format)
        if fmt in plugin_formats():
            return self._load_plugin_format(files, fmt)
        if self.format_options:
            raise DataError(f"data.format_options={dict(self.format_options)}: format {fmt!r} takes no options")
        files = check_files(files, fmt, self.text_field, self.skip_bad_records, self.work_dir / "clean_data")
        if fmt == "arrow":
            ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=self.cache_dir)
            return self._text_column(ds, files[0])
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

    def _load_saved(self):
        """A ``save_to_disk`` folder (Arrow files and JSON metadata: nothing is executed);
        of a DatasetDict, its "train" split (or its only one). Its Arrow files are read
        like data.format=arrow, so datasets' caches go to its cache folder, never into the
        user's folder."""
        import datasets

        folder = Path(self.path)
        if not is_saved_dataset(folder):
            raise DataError(f"data.path={self.path!r}: not a folder written by datasets' save_to_disk (no state.json "
                            "or dataset_dict.json)")
        try:
            if (folder / "dataset_dict.json").is_file():
                splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
                if "train" not in splits and len(splits) != 1:
                    raise DataError(f"data.path={self.path!r}: a DatasetDict with splits {splits} and no 'train' split")
                folder = folder / ("train" if "train" in splits else splits[0])
            names = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataError(f"data.path={self.path!r}: broken save_to_disk metadata ({type(e).__name__}: {e})") from None
        if any(Path(n).name != n for n in names):
            raise DataError(f"{folder / 'state.json'}: refused: data file names must be plain file names")
        ds = datasets.load_dataset("arrow", data_files=[str(folder / n) for n in names], split="train",
                                   cache_dir=self.cache_dir)
        return self._text_column(ds, self.path)

    def _text_column(self, ds, where: Any):
        """Only ``text_field`` (renamed "text"), checked to be text; null or empty rows
        dropped (null ones only with ``skip_bad_records``)."""
        feature = ds.features.get(self.text_field)
        if feature is None:
            raise DataError(f"{where}: no column {self.text_field!r} (columns: {ds.column_names}); set data.text_field")
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"{where}: column {self.text_field!r} holds {feature}, not text; set data.text_field")
        ds = ds.select_columns([self.text_field])
        if self.text_field != "text":
            ds = ds.rename_column(self.text_field, "text")
        nulls = [i for i, t in enumerate(ds["text"]) if t is None]
        if nulls and not self.skip_bad_records:
            raise DataError(f"{where}: row {nulls[0]}: {self.text_field!r} is null ({len(nulls)} rows are); fix them, "
                            "or set data.skip_bad_records=true to drop them")
        ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True, desc="dropping empty records")
        if len(ds) == 0:
            raise DataError(f"data.path={self.path!r}: every record is empty")
        return ds

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
            flat = [i for ids in batch["ids"] for i in ids]
            n = len(flat) // L_
            return {"input_ids": [flat[k * L_:(k + 1) * L_] for k in range(n)]}

        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {name}")
        ds = ds.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"packing {name}")
        if len(ds) == 0:
            raise DataError(f"data.path={self.path!r}: the {name} split has fewer than data.seq_len={L_} tokens")
        return ds.with_format("torch")

    # loaders -------------------------------------------------------------------
    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([r["input_ids"] for r in rows]).long()
        return {"input_ids": ids, "labels": ids}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=self.batch_size, sampler=self.train_sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_ds is None:
            return []
        return DataLoader(self.val_ds, batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)
