"""Training from pretokenized token shards (``data=tokens``): rows of ``seq_len`` tokens read
one at a time, at their offsets, from a folder ``llmzoo-data ... tokenize=`` wrote (``llmzoo.shared.tokens``), so
a corpus of any size trains without being loaded, tokenized or cached at start-up.

Rows are fixed (row i is always the same tokens), so the resumable sampler splits them over
the data-parallel ranks and a resumed run reads exactly the rows an uninterrupted one would.
``packing=document`` (or ``auto`` where the stack allows it) adds each token's document from
the shards' document offsets; ``concat`` joins documents as ``data=default`` does. Shards
written by another tokenizer are refused (their ids would mean other tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from llmzoo.data import DataError, TextDataModule
from llmzoo.interfaces import TokenizerExtras
from llmzoo.shared.tokens import TokenShards


class ShardRows(Dataset):
    """Rows ``start`` ... ``stop`` - 1 of the shards, as {"input_ids"[, "doc_ids"]} tensors."""

    def __init__(self, shards: TokenShards, start: int, stop: int, documents: bool):
        self.shards, self.start, self.stop, self.documents = shards, start, stop, documents

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, docs = self.shards.row(self.start + int(i))
        row = {"input_ids": torch.from_numpy(ids)}
        if self.documents:
            row["doc_ids"] = torch.from_numpy(docs)
        return row


class TokenShardsDataModule(TextDataModule):
    """``data=tokens``: ``path`` is a token shard folder; the last ``val_fraction`` of its rows
    (at most ``max_val_sequences``) validate."""

    def __init__(self, tokenizer: Any, *, path: str, seq_len: int = 128, batch_size: int = 16,
                 packing: str = "auto", val_fraction: float = 0.02, max_val_sequences: int = 128,
                 num_workers: int = 0, seed: int = 0, work_dir: str | None = None):
        super().__init__(tokenizer, path=path, seq_len=seq_len, batch_size=batch_size, val_fraction=val_fraction,
                         max_val_sequences=max_val_sequences, num_workers=num_workers, seed=seed,
                         work_dir=work_dir, packing=packing)
        if self.packing == "none":
            raise DataError("data=tokens: rows are packed (packing=document, concat or auto), not padded (none)")

    def _build(self) -> None:
        if not TokenizerExtras.of(self.tokenizer).is_trained:
            raise DataError(f"data=tokens: the tokenizer is not trained; train with the one saved in "
                            f"{self.path}/tokenizer (init_from= the run that wrote the shards, or its tokenizer=)")
        shards = TokenShards(self.path, self.seq_len)
        shards.check_tokenizer(self.tokenizer)
        n = len(shards)
        if n == 0:
            raise DataError(f"data.path={self.path}: no shard holds data.seq_len={self.seq_len} tokens")
        n_val = min(self.max_val_sequences, int(n * self.val_fraction)) if self.val_fraction > 0 and n > 1 else 0
        documents = self.packing == "document"
        self.train_ds = ShardRows(shards, 0, n - n_val, documents)
        self.val_ds = ShardRows(shards, n - n_val, n, documents) if n_val else None
