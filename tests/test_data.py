"""Data loading: formats, packing, and clear errors for bad input."""

import json

import pytest
import torch

from llmzoo.data import DataError, ResumableSampler, TextDataModule
from llmzoo_plugins.tokenizers import ByteTokenizer

DOCS = [f"record number {i} says hello" for i in range(40)]


def module(path, **kw):
    kw = {"seq_len": 16, "batch_size": 4, "val_fraction": 0.1, **kw}
    return TextDataModule(ByteTokenizer(), path=str(path), **kw)


def test_packing_is_the_concatenation_of_documents_and_eos(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(DOCS) + "\n")
    dm = module(f, val_fraction=0)
    dm.setup()
    tok = ByteTokenizer()
    flat = [i for d in DOCS for i in tok.encode(d) + [tok.eos_id]]
    blocks = torch.stack([dm.train_ds[i]["input_ids"] for i in range(len(dm.train_ds))]).flatten().tolist()
    assert len(blocks) == len(flat) // 16 * 16
    assert blocks == flat[: len(blocks)]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and torch.equal(batch["labels"], batch["input_ids"])


def test_documents_start_with_bos_when_the_tokenizer_says_so(tmp_path):
    """An imported Llama-style tokenizer (add_bos_token): <bos> doc <eos> <bos> doc <eos> ..."""
    from llmzoo_plugins.tokenizers import JsonTokenizer

    ByteTokenizer().hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = JsonTokenizer(tmp_path / "tokenizer.json", add_bos=True)
    f = tmp_path / "a.txt"
    f.write_text("\n".join(DOCS) + "\n")
    dm = TextDataModule(tok, path=str(f), seq_len=16, batch_size=4, val_fraction=0)
    dm.setup()
    flat = [i for d in DOCS for i in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    blocks = torch.cat([dm.train_ds[i]["input_ids"] for i in range(len(dm.train_ds))]).tolist()
    assert blocks == flat[:len(blocks)] and blocks[0] == tok.bos_id == 256


def test_jsonl_parquet_folder_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "x.jsonl", "w") as fh:
        for d in DOCS:
            fh.write(json.dumps({"body": d, "id": 1}) + "\n")
    dm = module(tmp_path / "d", text_field="body")
    dm.setup()
    assert len(dm.train_ds) > 0 and dm.val_ds is not None
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d" / "y.parquet")
    dm = module(str(tmp_path / "d" / "*.parquet"))
    dm.setup()
    assert len(dm.train_ds) > 0


def _tokens(dm):
    return torch.cat([dm.train_ds[i]["input_ids"] for i in range(len(dm.train_ds))]).tolist()


def test_save_to_disk_folders_and_arrow_files_give_the_rows_of_the_jsonl(tmp_path):
    """A save_to_disk folder (Dataset or DatasetDict) is recognised as such -- not as jsonl
    because of its .json metadata -- and a .arrow file loads as a table; both pack to
    exactly the tokens of the same records given as jsonl."""
    import datasets

    with open(tmp_path / "ref.jsonl", "w") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in DOCS)
    want = _tokens(_setup(module(tmp_path / "ref.jsonl", text_field="body", val_fraction=0)))
    ds = datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(tmp_path / "saved_dict")
    for path, fmt in ((tmp_path / "saved", "auto"), (tmp_path / "saved_dict", "auto"), (tmp_path / "saved", "hf_disk"),
                      (next((tmp_path / "saved").glob("*.arrow")), "auto"), (tmp_path / "saved", "arrow")):
        got = _tokens(_setup(module(path, format=fmt, text_field="body", val_fraction=0)))
        assert got == want, (path, fmt)
    with pytest.raises(DataError, match="holds Value.*int64.*not text"):
        module(tmp_path / "saved", text_field="n").setup()
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        module(tmp_path, format="hf_disk").setup()


def _setup(dm):
    dm.setup()
    return dm


def test_missing_path_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        module(tmp_path / "missing.txt").setup()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        module(tmp_path / "empty.txt").setup()


def test_bad_utf8_names_file_and_line_or_is_skipped_and_counted(tmp_path, caplog):
    f = tmp_path / "bad.txt"
    f.write_bytes(("\n".join(DOCS[:10]) + "\n").encode() + b"caf\xe9 au lait\n" + ("\n".join(DOCS[10:]) + "\n").encode())
    with pytest.raises(DataError, match=r"bad.txt:11: bytes are not valid UTF-8"):
        module(f).setup()
    dm = module(f, skip_bad_records=True, work_dir=str(tmp_path / "run"))
    with caplog.at_level("WARNING"):
        dm.setup()
    assert "skipped 1 bad records" in caplog.text and "bad.txt:11" in caplog.text


def test_bad_json_and_missing_field(tmp_path):
    f = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines[3] = "{not json"
    lines[7] = json.dumps({"other": "field"})
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        module(f).setup()
    assert "x.jsonl:4: not valid JSON" in str(e.value) and "x.jsonl:8: record has no string field 'text'" in str(e.value)
    dm = module(f, skip_bad_records=True, work_dir=str(tmp_path / "run"))
    dm.setup()
    n_tokens = sum(len(d.encode()) + 1 for i, d in enumerate(DOCS) if i not in (3, 7))
    assert len(dm.train_ds) + (len(dm.val_ds) if dm.val_ds else 0) >= (n_tokens // 16) - 2


def test_format_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match="set data.format"):
        module(tmp_path / "a.csv").setup()
    f = tmp_path / "short.txt"
    f.write_text("hi\n")
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        module(f, val_fraction=0).setup()


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = list(ResumableSampler(20, 3, seed=5))
    s = ResumableSampler(20, 3, seed=5)
    s.start_batch = 2
    assert list(s) == full[6:] and list(s) == full  # the skip applies once
    s.set_epoch(1)
    assert list(s) != full and len(list(s)) == 18  # a new permutation each epoch
    ranks = [list(ResumableSampler(20, 3, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 9 and not set(ranks[0]) & set(ranks[1])
    # the first global batch (3 per rank) is the first 6 of the single-process order
    assert sorted(ranks[0][:3] + ranks[1][:3]) == sorted(list(ResumableSampler(20, 6, seed=5))[:6])
