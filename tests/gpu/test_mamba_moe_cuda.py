"""mamba_ssm kernels and MoE grouped GEMM on CUDA against the pure-PyTorch references."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from llmzoo_plugins.mamba import Mamba2Block, MambaBlock  # noqa: E402
from llmzoo_plugins.moe import MoE  # noqa: E402


@pytest.mark.parametrize("cls,kw", [(MambaBlock, {"d_state": 16}), (Mamba2Block, {"d_state": 64, "headdim": 64})])
def test_mamba_ssm_kernels_match_chunked_reference(cls, kw):
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    fast = cls(256, backend="cuda", **kw).cuda()
    ref = cls(256, backend="chunked", **kw).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 300, 256, device="cuda")
    torch.testing.assert_close(fast(x), ref(x), atol=2e-3, rtol=2e-3)


def test_moe_grouped_mm_bf16_matches_reference():
    torch.manual_seed(0)
    ref = MoE(256, n_experts=8, top_k=2, hidden=512, backend="reference").cuda().to(torch.bfloat16)
    fast = MoE(256, n_experts=8, top_k=2, hidden=512, backend="torch").cuda().to(torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x).float(), ref(x).float(), atol=3e-2, rtol=3e-2)
