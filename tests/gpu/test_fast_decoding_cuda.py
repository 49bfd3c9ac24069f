"""CUDA-only: the static decoder with CUDA graphs (mode=reduce-overhead) gives greedy's
tokens and compiles once; quantized layers run on CUDA through the dequantize path."""

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(block):
    import llmzoo

    cfg = llmzoo.compose(overrides=["model=tiny", f"block={block}", "model.vocab_size=64"])
    torch.manual_seed(0)
    return llmzoo.build_model(cfg).cuda().eval()


@pytest.mark.parametrize("block", ["dense", "moe", "mamba2"])
def test_cuda_graph_static_decoding_equals_greedy(block):
    from torch._dynamo.utils import counters

    from llmzoo_plugins.sampling import Greedy
    from llmzoo_plugins.static_cache import StaticCache

    model = _model(block)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    ref = Greedy().generate(model, prompts, max_new_tokens=24)
    torch._dynamo.reset()
    counters.clear()
    dec = StaticCache(mode="reduce-overhead")
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert dec.generate(model, prompts, max_new_tokens=24) == ref
        assert dec.generate(model, prompts, max_new_tokens=24) == ref
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_on_cuda_matches_cpu(mode):
    from llmzoo_plugins.quantize import Quantize

    model = _model("dense").cpu()
    q_cpu = Quantize(mode, reference=True)(copy.deepcopy(model))
    q_gpu = copy.deepcopy(q_cpu).cuda()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(q_gpu(ids.cuda()).logits.cpu(), q_cpu(ids).logits, atol=1e-4, rtol=1e-4)
