"""Pretokenized token shards: written by ``llmzoo-data ... tokenize=`` (``write_token_shards``),
read by ``data=tokens`` (``TokenShards``) row by row at their offsets, so a corpus is never loaded whole.
(Rows are read with ``os.pread``, not a memory map: on this kernel a memory-mapped read of one
shuffled row brought a ~1.3 MB page-cache folio into the process's resident set, so 1,000 rows
cost 1.3 GB of RSS; ``pread`` copies only the row.)

A shard folder holds:
  index.json            {"format": "llmzoo-tokens", "version": 1, "dtype": "uint16" | "uint32",
                         "vocab_size", "tokenizer": <sha256 of its files>, "shards": [{"tokens",
                         "docs", "n_tokens", "n_docs"}, ...]}
  shard-NNNNN.bin       token ids, one document after another (bos when the tokenizer adds
                        one, the text, eos: as ``data=default`` joins them)
  shard-NNNNN.docs.bin  int64 offset of each document's first token in the shard
  tokenizer/            the tokenizer that wrote them
Only JSON and raw integers are read back: nothing in a shard folder is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError
from ..interfaces import TokenizerExtras

FORMAT, VERSION, INDEX = "llmzoo-tokens", 1, "index.json"


def fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's saved files: shards and runs agree on it or the ids mean other things."""
    from ..api import tokenizer_files

    h = hashlib.sha256()
    for name, text in sorted(tokenizer_files(tokenizer).items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def write_token_shards(texts: Iterable[str], tokenizer: Any, out: Path, *, shard_tokens: int = 1 << 26,
                       total: int | None = None) -> dict[str, Any]:
    """Tokenize ``texts`` into shards of about ``shard_tokens`` tokens under ``out`` (a progress
    bar counts documents); returns the index (also written as index.json, last, so a folder
    without one is unfinished)."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    bos = [tokenizer.bos_id] if TokenizerExtras.of(tokenizer).add_bos else []
    shards: list[dict[str, Any]] = []
    ids: list[int] = []
    starts: list[int] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}"
        np.asarray(ids, dtype=dtype).tofile(out / f"{name}.bin")
        np.asarray(starts, dtype=np.int64).tofile(out / f"{name}.docs.bin")
        shards.append({"tokens": f"{name}.bin", "docs": f"{name}.docs.bin", "n_tokens": len(ids),
                       "n_docs": len(starts)})
        ids.clear()
        starts.clear()

    for text in tqdm(texts, total=total, desc="tokenizing", unit="doc"):
        starts.append(len(ids))
        ids.extend(bos + tokenizer.encode(text) + [tokenizer.eos_id])
        if len(ids) >= shard_tokens:
            flush()
    if ids or not shards:
        flush()
    tokenizer.save(out / "tokenizer")
    index = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
             "tokenizer": fingerprint(tokenizer), "shards": shards}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


class TokenShards:
    """The shards of a folder as rows of ``seq_len`` tokens (rows never cross shards; a
    shard's last partial row is left out), each read from its file when asked."""

    def __init__(self, folder: str | Path, seq_len: int):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"data.path={folder}: not a token shard folder (no readable {INDEX}: {e}); write one "
                            "with llmzoo-data ... tokenize=<run folder or tokenizer>") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{self.folder / INDEX}: format {index.get('format')!r} version {index.get('version')!r}, "
                            f"not {FORMAT!r} version {VERSION}")
        if index.get("dtype") not in ("uint16", "uint32"):
            raise DataError(f"{self.folder / INDEX}: dtype {index.get('dtype')!r} is not uint16 or uint32")
        self.index, self.seq_len = index, seq_len
        self.dtype = np.dtype(index["dtype"])
        self.itemsize = self.dtype.itemsize
        self.tokens: list[Path] = []
        self.docs: list[np.ndarray] = []
        self._files: dict[int, int] = {}  # shard -> file descriptor, opened on first read in each process
        counts = []
        for s in index["shards"]:
            for name in (s["tokens"], s["docs"]):
                if Path(name).name != name:
                    raise DataError(f"{self.folder / INDEX}: refused: shard file {name!r} is not a plain file name")
            path = self.folder / s["tokens"]
            n = path.stat().st_size // self.itemsize if path.is_file() else -1
            if n != s["n_tokens"]:
                raise DataError(f"{path}: {max(n, 0)} tokens, the index says {s['n_tokens']}")
            self.tokens.append(path)
            self.docs.append(np.fromfile(self.folder / s["docs"], dtype=np.int64))
            counts.append(n // seq_len)
        self.first_row = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard i: rows first_row[i]...

    def __len__(self) -> int:
        return int(self.first_row[-1])

    def check_tokenizer(self, tokenizer: Any) -> None:
        if fingerprint(tokenizer) != self.index["tokenizer"] or tokenizer.vocab_size != self.index["vocab_size"]:
            raise DataError(f"data.path={self.folder}: these shards were written by another tokenizer (vocabulary "
                            f"{self.index['vocab_size']}, the run's {tokenizer.vocab_size}, or other files): train "
                            f"with the one saved in {self.folder / 'tokenizer'} (e.g. init_from= the run that wrote "
                            "them, or the same tokenizer= option)")

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``: its token ids and the document index of each token (int64, (seq_len,) each)."""
        shard = int(np.searchsorted(self.first_row, i, side="right")) - 1
        start = (i - int(self.first_row[shard])) * self.seq_len
        offsets = np.arange(start, start + self.seq_len)
        if shard not in self._files:
            self._files[shard] = os.open(self.tokens[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], self.seq_len * self.itemsize, start * self.itemsize)
        ids = np.frombuffer(data, dtype=self.dtype).astype(np.int64)
        return ids, np.searchsorted(self.docs[shard], offsets, side="right") - 1

    def __getstate__(self) -> dict:  # DataLoader workers open their own files
        return {**self.__dict__, "_files": {}}
