import pytest

from llmzoo_plugins.tokenizers import BPETokenizer, ByteTokenizer, JsonTokenizer, load_tokenizer

TEXT = "Once upon a time, Ada the fox found a key. Grüße, 東京! 17 + 25 = 42."


def test_byte_roundtrip_and_specials(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == TEXT
    assert {tok.bos_id, tok.eos_id, tok.pad_id} <= set(range(tok.vocab_size))
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_fit_save_load_and_file_tokenizer(tmp_path):
    texts = [TEXT, "the fox and the owl", "the cat and the hat"] * 50
    tok = BPETokenizer(vocab_size=400, min_frequency=2)
    assert not tok.is_trained
    with pytest.raises(RuntimeError, match="not trained"):
        tok.encode("x")
    tok.fit(texts)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges happened
    assert tok.vocab_size == 400 and max(ids) < tok.vocab_size
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again.encode(TEXT) == ids and again.eos_id == tok.eos_id
    plain = JsonTokenizer(tmp_path / "t" / "tokenizer.json")  # tokenizer=file
    assert plain.encode(TEXT) == ids and plain.bos_id == tok.bos_id
    with pytest.raises(FileNotFoundError):
        JsonTokenizer(tmp_path / "nope.json")
