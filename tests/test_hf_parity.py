"""Our MoE, Mamba and Mamba-2 models against Hugging Face's Mixtral, Mamba and Mamba-2
given the same weights: the logits must match."""

import pytest
import torch

from llmzoo import LanguageModel
from llmzoo_plugins.attention import Attention
from llmzoo_plugins.mamba import Mamba2Block, MambaBlock
from llmzoo_plugins.moe import MoEBlock

transformers = pytest.importorskip("transformers")
VOCAB, DIM = 61, 32


def common(ours, prefix="backbone"):
    emb = f"{prefix}.embeddings.weight" if prefix == "backbone" else f"{prefix}.embed_tokens.weight"
    norm = f"{prefix}.norm_f.weight" if prefix == "backbone" else f"{prefix}.norm.weight"
    return {emb: ours.embedding.weight, norm: ours.norm.weight, "lm_head.weight": ours.head.weight}


def mamba_state_dict(ours):
    """HF Mamba / Mamba-2 names: the mixers use the same parameter names as ours."""
    sd = common(ours)
    for i, b in enumerate(ours.blocks):
        sd[f"backbone.layers.{i}.norm.weight"] = b.mixer_norm.weight
        sd.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in b.mixer.state_dict().items()})
    return sd


def assert_same_logits(ours, hf, sd):
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, hf.eval()(ids).logits, atol=5e-5, rtol=1e-4)


def test_moe_matches_mixtral():
    torch.manual_seed(0)
    E, H, layers = 4, 48, 2
    blocks = [MoEBlock(DIM, Attention(DIM, 4, 2, 64, backend="reference"), n_experts=E, top_k=2, hidden=H,
                       gating="softmax_norm", backend="torch") for _ in range(layers)]
    ours = LanguageModel(VOCAB, DIM, blocks, max_seq_len=64)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=H, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False))
    sd = common(ours, "model")
    for i, b in enumerate(ours.blocks):
        p, hd = f"model.layers.{i}.", DIM // 4
        sd.update({p + "self_attn.q_proj.weight": b.mixer.q.weight, p + "self_attn.k_proj.weight": b.mixer.k.weight,
                   p + "self_attn.v_proj.weight": b.mixer.v.weight, p + "self_attn.o_proj.weight": b.mixer.out.weight,
                   p + "mlp.gate.weight": b.ffn.router.weight,
                   p + "mlp.experts.gate_up_proj": b.ffn.w_gate_up.transpose(1, 2),
                   p + "mlp.experts.down_proj": b.ffn.w_down.transpose(1, 2),
                   p + "input_layernorm.weight": b.mixer_norm.weight,
                   p + "post_attention_layernorm.weight": b.ffn_norm.weight})
    assert_same_logits(ours, hf, sd)


def test_mamba_matches_hf_mamba():
    torch.manual_seed(0)
    blocks = [MambaBlock(DIM, d_state=8, expand=2, mlp=False, backend="torch") for _ in range(2)]
    ours = LanguageModel(VOCAB, DIM, blocks, max_seq_len=64)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=DIM, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, use_bias=False, use_conv_bias=True))
    assert_same_logits(ours, hf, mamba_state_dict(ours))


def test_mamba2_matches_hf_mamba2():
    torch.manual_seed(0)
    blocks = [Mamba2Block(DIM, d_state=8, expand=2, headdim=16, ngroups=1, chunk_size=8, mlp=False, backend="torch")
              for _ in range(2)]
    ours = LanguageModel(VOCAB, DIM, blocks, max_seq_len=64)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=DIM, state_size=8, num_hidden_layers=2, expand=2, head_dim=16, num_heads=4,
        n_groups=1, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        use_bias=False, use_conv_bias=True))
    assert_same_logits(ours, hf, mamba_state_dict(ours))
