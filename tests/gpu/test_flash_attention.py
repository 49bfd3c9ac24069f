"""flash-attn against the reference attention (CUDA only)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
flash_attn = pytest.importorskip("flash_attn")

from llmzoo_plugins.attention import DenseBlock, attention_flash, attention_reference, attention_sdpa  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t_q,t_k,kv", [(256, 256, 8), (1, 300, 2), (7, 64, 4)])
def test_flash_matches_reference(dtype, t_q, t_k, kv):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, t_q, 64, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(2, kv, t_k, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    ref = attention_reference(q.float(), k.float(), v.float())
    for fn in (attention_flash, attention_sdpa):
        torch.testing.assert_close(fn(q, k, v).float(), ref, atol=2e-2, rtol=2e-2)


def test_dense_block_flash_stateful_decode():
    block = DenseBlock(dim=256, n_heads=4, n_kv_heads=2, max_seq_len=64, backend="flash").cuda().to(torch.bfloat16)
    x = torch.randn(2, 32, 256, device="cuda", dtype=torch.bfloat16)
    ref = DenseBlock(dim=256, n_heads=4, n_kv_heads=2, max_seq_len=64, backend="reference").cuda().to(torch.bfloat16)
    ref.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(x).float(), ref(x).float(), atol=5e-2, rtol=5e-2)
    assert block.mixer.backend_used == "flash"


def test_auto_picks_flash_on_cuda_bf16():
    block = DenseBlock(dim=128, n_heads=2, max_seq_len=16, backend="auto").cuda().to(torch.bfloat16)
    block(torch.randn(1, 4, 128, device="cuda", dtype=torch.bfloat16))
    assert block.mixer.backend_used == "flash"
