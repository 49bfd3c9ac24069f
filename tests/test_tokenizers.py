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


@pytest.mark.parametrize("kind", ["instructions", "preferences", "prompts"])
def test_a_tokenizer_is_fitted_on_the_rendered_chat_not_the_raw_records(kind):
    """data=instructions|preferences|prompts fit a BPE tokenizer on what the model sees:
    each rendered piece, chat markers included, and no JSON syntax or field names."""
    from llmzoo.data import resolve_files
    from llmzoo_plugins.chat_data import RecordsDataModule, read_records, record_texts

    from importlib import resources

    path = str(resources.files("llmzoo.assets") / f"{kind}.jsonl")
    tok = BPETokenizer(vocab_size=600)
    seen = []
    fit = tok.fit
    tok.fit = lambda texts: (seen.extend(texts), fit(seen))
    RecordsDataModule(tok, path=path, kind=kind, seq_len=64).prepare_data()
    records = read_records(resolve_files(path, "jsonl")[0], kind, False)
    joined = "\n".join(seen)
    user = ByteTokenizer().render_chat([{"role": "user", "content": "x"}], generation_prompt=True)[0][0].split("x")[0]
    assert user.strip() and user in joined  # the chat markers are in the fitted text
    assert '{"' not in joined and '"prompt"' not in joined and '"instruction"' not in joined
    assert seen == [t for r in records for t in record_texts(ByteTokenizer(), r, kind)]
    assert tok.is_trained
    marker_ids = tok.encode(user)
    assert len(marker_ids) < len(user.encode()), "the markers should have been merged"
