"""Pretokenized token shards (llmzoo.shared.tokens, data=tokens): what is written reads back
row by row through memory maps, with each token's document; shards written by another
tokenizer and index files naming paths are refused; a run trains from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, tiny_cfg, train_run
from llmzoo.data import DataError
from llmzoo.interfaces import IGNORE_INDEX
from llmzoo.shared.tokens import TokenShards, write_token_shards

TEXTS = [f"document {i}: " + "the cell reads the gene. " * (i % 5 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    from llmzoo.api import build_tokenizer

    return build_tokenizer(tiny_cfg())  # the byte tokenizer: trained as built


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("shards") / "tokens"
    write_token_shards(iter(TEXTS), tokenizer, out, shard_tokens=700)  # several shards
    return out


def test_rows_read_back_the_documents_with_their_boundaries(folder, tokenizer):
    index = json.loads((folder / "index.json").read_text())
    assert len(index["shards"]) > 2 and index["dtype"] == "uint16"
    stream = [t for text in TEXTS for t in tokenizer.encode(text) + [tokenizer.eos_id]]
    doc_of = [d for d, text in enumerate(TEXTS) for _ in range(len(tokenizer.encode(text)) + 1)]
    shards = TokenShards(folder, seq_len=32)
    assert len(shards) == sum(s["n_tokens"] // 32 for s in index["shards"])
    start, row = 0, 0
    for s in index["shards"]:  # rows never cross shards: each shard's tail is left out
        for k in range(s["n_tokens"] // 32):
            ids, docs = shards.row(row)
            assert ids.tolist() == stream[start + 32 * k: start + 32 * (k + 1)]
            first_doc = doc_of[start]  # documents restart their numbering in each shard
            assert (docs + first_doc).tolist() == doc_of[start + 32 * k: start + 32 * (k + 1)]
            row += 1
        start += s["n_tokens"]


def test_data_module_gives_packed_rows_and_refuses_another_tokenizer(folder, tokenizer, tmp_path):
    from llmzoo_plugins.token_shards import TokenShardsDataModule

    dm = TokenShardsDataModule(tokenizer, path=str(folder), seq_len=32, batch_size=4, packing="document",
                               val_fraction=0.1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    starts = torch.nn.functional.pad(batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1], (1, 0), value=True)
    assert bool((batch["labels"][starts] == IGNORE_INDEX).all()) and len(dm.val_ds) >= 1

    class Other:  # same vocabulary size, other files
        vocab_size, bos_id, eos_id, pad_id = tokenizer.vocab_size, 0, 1, 2

        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text('{"other": true}')

    with pytest.raises(DataError, match="written by another tokenizer"):
        TokenShards(folder, 32).check_tokenizer(Other())


def test_an_index_naming_a_path_is_refused(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    index = json.loads((folder / "index.json").read_text())
    index["shards"][0]["tokens"] = "../../etc/passwd"
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="not a plain file name"):
        TokenShards(bad, 32)
    with pytest.raises(DataError, match="not a token shard folder"):
        TokenShards(tmp_path / "nowhere", 32)


def test_a_run_trains_from_token_shards(folder, tmp_path):
    summary = train_run("model=tiny", "data=tokens", f"data.path={folder}", "data.seq_len=32", "data.batch_size=4",
                        "trainer.max_steps=2", "trainer.val_every=0", f"run_dir={tmp_path / 'run'}", *FAST)
    assert summary["step"] == 2 and np.isfinite(summary["train_loss"]) and summary["tokens_seen"] == 2 * 4 * 32
    assert "packing: document" in (tmp_path / "run" / "config.yaml").read_text()
