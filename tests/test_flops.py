"""FLOPs per token derived from the model against torch.utils.flop_counter."""

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llmzoo
import llmzoo_plugins.moe as moe

# reference attention so that every matmul is a plain (counted) matmul
CASES = [("dense", ["block.backend=reference"]), ("moe", ["block.mixer.backend=reference"]), ("mamba", []),
         ("mamba2", []), ("hybrid", ["block.mixers.attention.backend=reference"])]


@pytest.mark.parametrize("block,extra", CASES)
@pytest.mark.parametrize("T", [40, 96])
def test_flops_per_token_matches_flop_counter(block, extra, T):
    cfg = llmzoo.compose(overrides=["model=tiny", f"block={block}", *extra])
    model = llmzoo.build_model(cfg).eval()
    ids = torch.randint(0, model.vocab_size, (2, T))
    # count the per-expert matmuls one by one (torch._grouped_mm has no FLOP formula)
    with mock.patch.object(moe, "_grouped_mm_ok", lambda x: False), FlopCounterMode(display=False) as fc, \
            torch.no_grad():
        model(ids)
    measured = fc.get_total_flops() / ids.numel()
    assert measured > 0
    assert abs(model.flops_per_token(T) - measured) <= 0.05 * measured, (model.flops_per_token(T), measured)


def test_moe_counts_only_active_experts():
    cfg = llmzoo.compose(overrides=["model=tiny", "block=moe"])
    m = llmzoo.build_model(cfg)
    block = m.blocks[0].ffn
    dense_all = 8 * 6 * m.dim * block.hidden
    assert block.flops_per_token(64) < dense_all / 3  # top-2 of 8
