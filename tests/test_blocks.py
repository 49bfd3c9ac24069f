"""The dense block against the conformance checks, its backends against each other,
and the whole model against Hugging Face's Llama with the same weights."""

import pytest
import torch

from llmzoo.testing import (check_block, check_causality, check_dtype_move, check_model_decode,
                            check_state_dict_roundtrip, check_stateful_decode)
from llmzoo_plugins.attention import Attention, DenseBlock, attention_reference, attention_sdpa
from llmzoo_plugins.hf_models import hf_state_dict

DIM = 32


def make_dense(backend="reference", n_kv_heads=2):
    return lambda: DenseBlock(dim=DIM, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_dense_block_conformance(backend, n_kv_heads):
    check_block(make_dense(backend, n_kv_heads), DIM)


def test_conformance_checks_catch_broken_blocks():
    """The checks must fail on a block that peeks at the future or whose state is wrong."""

    class Leaky(DenseBlock):
        def forward(self, x, *, state=None):
            return super().forward(x, state=state) + x.flip(1).cumsum(1).flip(1) * 1e-3

    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="not causal"):
        check_causality(Leaky(dim=DIM, n_heads=4, max_seq_len=64), DIM)

    class ForgetfulCache(DenseBlock):
        def forward(self, x, *, state=None):
            if state is not None:
                state.pos = 0  # forgets the past
                state.k.zero_()
            return super().forward(x, state=state)

    with pytest.raises(AssertionError, match="stateful decode"):
        check_stateful_decode(ForgetfulCache(dim=DIM, n_heads=4, max_seq_len=64), DIM)

    class Unsaved(DenseBlock):  # a weight outside the state dict: round trip must notice
        def __init__(self, **kw):
            super().__init__(**kw)
            self.secret = torch.randn(DIM)

        def forward(self, x, *, state=None):
            return super().forward(x, state=state) + self.secret

    with pytest.raises(AssertionError, match="round trip"):
        check_state_dict_roundtrip(lambda: Unsaved(dim=DIM, n_heads=4, max_seq_len=64), DIM)


@pytest.mark.parametrize("t_q,t_k", [(16, 16), (1, 9), (4, 11)])
def test_sdpa_matches_reference(t_q, t_k):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t_q, 8, generator=g)
    k, v = torch.randn(2, 2, t_k, 8, generator=g), torch.randn(2, 2, t_k, 8, generator=g)
    torch.testing.assert_close(attention_sdpa(q, k, v), attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_reference_attention_is_the_formula():
    """attention_reference against softmax(QK^T/sqrt(d) + causal mask) V written out per query."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention_reference(q, k, v)
    for h in range(2):
        for i in range(5):
            w = torch.softmax(q[0, h, i] @ k[0, h, : i + 1].T / 2.0, dim=-1)
            torch.testing.assert_close(out[0, h, i], w @ v[0, h, : i + 1])


def test_backend_auto_on_cpu_is_sdpa_and_flash_refuses_cpu():
    a = Attention(DIM, 4, 2, 16, backend="auto")
    a(torch.randn(1, 3, DIM))
    assert a.backend_used == "sdpa"
    b = Attention(DIM, 4, 2, 16, backend="flash")
    with pytest.raises(RuntimeError, match="flash"):
        b(torch.randn(1, 3, DIM))


def test_model_matches_hf_llama_with_same_weights():
    """LanguageModel(dense) == transformers.LlamaForCausalLM given the same weights."""
    transformers = pytest.importorskip("transformers")
    from llmzoo import LanguageModel

    dim, heads, kv, layers, vocab, hidden = 64, 4, 2, 2, 101, 96
    torch.manual_seed(0)
    blocks = [DenseBlock(dim=dim, n_heads=heads, n_kv_heads=kv, max_seq_len=32, ffn_hidden=hidden,
                         backend="reference", layer_idx=i) for i in range(layers)]
    ours = LanguageModel(vocab, dim, blocks, max_seq_len=32).eval()
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = hf_state_dict(ours)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-4)


def test_greedy_decoding_matches_hf_generate_with_same_weights():
    """Our greedy decoder (growing KV cache) and transformers' ``generate`` (its own cache)
    produce the same tokens from the same weights."""
    transformers = pytest.importorskip("transformers")
    import llmzoo
    from llmzoo_plugins.sampling import Greedy

    cfg = llmzoo.compose(overrides=["model=tiny", "model.vocab_size=97", "model.init_std=0.1"])
    torch.manual_seed(0)
    ours = llmzoo.build_model(cfg).eval()
    m = cfg.model
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=m.dim, intermediate_size=ours.blocks[0].ffn.hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False)).eval()
    hf.load_state_dict(hf_state_dict(ours), strict=False)
    prompt = [5, 17, 3, 88, 41]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert Greedy().generate(ours, [prompt], max_new_tokens=40) == [want]


def test_language_model_stateful_decode_matches_full_forward():
    import llmzoo

    cfg = llmzoo.compose(overrides=["model=tiny"])
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg).eval()
    ids = torch.randint(0, model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    check_model_decode(model, ids, prefill=7)


def test_dtype_move_bfloat16_runs():
    block = make_dense("sdpa")().to(torch.bfloat16)
    y = block(torch.randn(2, 5, DIM, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    check_dtype_move(make_dense("sdpa")(), DIM)
