"""kernels=liger without a GPU: the swapped layers fall back to the PyTorch references
(same weights, same outputs), and the options are checked. The kernels themselves are
compared with the references in tests/gpu/test_triton_kernels.py."""

import pytest
import torch

import llmzoo
from llmzoo.errors import UserError
from llmzoo.testing import check_kernels


def _cfg(*extra):
    return llmzoo.compose(overrides=["model=tiny", "block=dense", "model.vocab_size=64", *extra])


def test_liger_option_builds_and_falls_back_to_the_references_on_cpu():
    from llmzoo_plugins.kernels import Liger

    torch.manual_seed(0)
    model = llmzoo.build_model(_cfg("kernels=liger"))
    swapped = [m for m in model.modules() if "forward" in vars(m) or "rotary" in vars(m)]
    assert len(swapped) == 4 * len(model.blocks) + 1  # 2 norms, the MLP, RoPE per block; the final norm
    torch.manual_seed(0)
    plain = llmzoo.build_model(_cfg())
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=0, rtol=0)
    check_kernels(Liger(), plain, ids, atol=0)


def test_check_kernels_catches_a_kernel_that_changes_the_output():
    class Wrong:
        name = "wrong"

        def apply(self, model):
            model.norm.eps = 1.0  # a "kernel" with a different epsilon
            return model

    with pytest.raises(AssertionError, match="logits with the kernels differ"):
        check_kernels(Wrong(), llmzoo.build_model(_cfg()), torch.randint(0, 64, (1, 8)), atol=1e-5)


def test_liger_by_name_without_cuda_is_a_clear_error():
    from llmzoo_plugins.kernels import Liger, liger_available

    model = Liger(backend="liger").apply(llmzoo.build_model(_cfg())) if liger_available() else None
    if model is not None:  # installed: refused at the first forward on CPU tensors
        with pytest.raises(RuntimeError, match="needs liger-kernel installed and CUDA tensors"):
            model(torch.randint(0, 64, (1, 4)))
    else:
        with pytest.raises(UserError, match="liger-kernel is not installed"):
            Liger(backend="liger").apply(llmzoo.build_model(_cfg()))
    with pytest.raises(UserError, match="not one of"):
        Liger(backend="fast")


def test_mamba_triton_backend_is_for_mamba2_only():
    from llmzoo.config import ConfigError

    with pytest.raises(ConfigError, match="triton"):
        llmzoo.compose(overrides=["model=tiny", "block=mamba", "block.backend=triton"])
    cfg = llmzoo.compose(overrides=["model=tiny", "block=mamba2", "block.backend=triton", "model.vocab_size=64"])
    model = llmzoo.build_model(cfg)
    with pytest.raises(RuntimeError, match="needs fla-core installed and CUDA"):
        model(torch.randint(0, 64, (1, 4)))
