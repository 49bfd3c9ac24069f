"""Hybrid (Jamba-like) stacks: per-layer blocks from a pattern, decoding across mixed states."""

import pytest
import torch

import llmzoo
from llmzoo.config import ConfigError
from llmzoo.testing import check_model_decode
from llmzoo_plugins.sampling import Greedy


def test_layers_follow_the_pattern_and_decode_matches_full_forward():
    cfg = llmzoo.compose(overrides=["model=tiny", "block=hybrid", "model.n_layers=4"])
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg).eval()
    kinds = [b.kind for b in model.blocks]
    assert kinds == [("mamba2", "swiglu"), ("attention", "moe"), ("mamba2", "swiglu"), ("attention", "moe")]
    assert type(model.blocks[1].mixer).__name__ == "Attention" and type(model.blocks[0].mixer).__name__ == "Mamba2Mixer"
    ids = torch.randint(0, model.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    check_model_decode(model, ids, prefill=5)
    with torch.no_grad():
        full = model(ids).logits
    # causality of the whole hybrid stack
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % model.vocab_size
    # (not bit-exact: MoE groups a different set of tokens per expert, and on some CPUs the
    # GEMM then rounds differently, ~1e-8; a leak from position 10 would be orders larger)
    with torch.no_grad():
        torch.testing.assert_close(model(ids2).logits[:, :10], full[:, :10], atol=1e-6, rtol=0)


def test_greedy_on_hybrid_equals_full_forward_argmax():
    cfg = llmzoo.compose(overrides=["model=tiny", "block=hybrid"])
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg).eval()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    got = Greedy().generate(model, prompts, max_new_tokens=6)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert g == seq[len(p):]


def test_bad_pattern_and_capability_messages():
    with pytest.raises(ConfigError, match=r"block: mixer_pattern names \['ssm'\], not in block.mixers"):
        llmzoo.compose(overrides=["block=hybrid", "block.mixer_pattern=[ssm,attention]"])
    # a nested mixer's own check runs too, named by its key
    with pytest.raises(ConfigError, match=r"block.mixers.attention: n_heads=5 does not divide dim=64"):
        llmzoo.compose(overrides=["block=hybrid", "model.dim=64", "block.mixers.attention.n_heads=5"])

    import sys
    import types

    class NeedsKV:
        requires = frozenset({"kv_cache"})

    sys.modules["fake_kv_decoder"] = types.SimpleNamespace(NeedsKV=NeedsKV)
    try:
        with pytest.raises(ConfigError) as e:
            llmzoo.compose(overrides=["block=hybrid", "decoder._target_=fake_kv_decoder.NeedsKV"])
        with pytest.raises(ConfigError) as e2:
            llmzoo.compose(overrides=["block=mamba2", "decoder._target_=fake_kv_decoder.NeedsKV"])
        llmzoo.compose(overrides=["block=moe", "decoder._target_=fake_kv_decoder.NeedsKV"])  # attention inside: fine
    finally:
        del sys.modules["fake_kv_decoder"]
    assert "hybrid mixer 'mamba2' (llmzoo_plugins.mamba.Mamba2Mixer) lacks ['kv_cache']" in str(e.value)
    assert "attention" not in str(e.value).split("lacks")[0].split("hybrid mixer")[-1]
    assert "llmzoo_plugins.mamba.Mamba2Block lacks ['kv_cache']" in str(e2.value)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_hybrid_preset_layers_pass_conformance(layer_idx):
    from hydra.utils import instantiate

    from llmzoo.testing import check_block

    cfg = llmzoo.compose(overrides=["model=tiny", "block=hybrid"])
    check_block(lambda: instantiate(cfg.block, layer_idx=layer_idx), cfg.model.dim)
