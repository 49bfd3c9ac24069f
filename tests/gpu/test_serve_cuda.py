"""CUDA-only: the serving engine's continuous batching (row states, put/head) and
Medusa's rows verification give greedy decoding's tokens on the GPU too."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(block, vocab=64):
    import llmzoo

    cfg = llmzoo.compose(overrides=["model=tiny", f"block={block}", f"model.vocab_size={vocab}"])
    torch.manual_seed(0)
    return llmzoo.build_model(cfg).cuda().eval()


@pytest.mark.parametrize("block", ["dense", "moe", "mamba2", "hybrid"])
def test_engine_on_cuda_equals_greedy_alone(block):
    from types import SimpleNamespace

    from llmzoo.shared.decoding import Sampler
    from llmzoo_plugins.sampling import Greedy
    from llmzoo_plugins.serve import Engine, Request

    model = _model(block)
    tok = SimpleNamespace(eos_id=63, decode=lambda ids: ",".join(map(str, ids)))
    prompts = [[1 + (i * 7) % 50 + j for j in range(1 + i % 9)] for i in range(24)]
    lengths = [3 + (5 * i) % 17 for i in range(24)]
    engine = Engine(model, tok, max_batch=8, max_queue=64)
    got = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.submit(Request(prompt=p, max_tokens=n, sampler=Sampler(),
                              emit=lambda text, finish, i=i: got.__setitem__(i, got.get(i, "") + text)))
    while engine.queue or engine.active:
        engine.step()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = Greedy().generate(model, [p], max_new_tokens=n, eos_id=63)[0]
        want = [t for t in want if t != 63]
        assert got[i] == tok.decode(want), (block, i)
    assert engine.peak_batch == 8


@pytest.mark.parametrize("block", ["mamba2", "hybrid"])
def test_medusa_rows_verification_on_cuda_equals_greedy(block):
    from llmzoo_plugins.medusa import Medusa, MedusaObjective
    from llmzoo_plugins.sampling import Greedy

    model = _model(block, vocab=8)
    heads = MedusaObjective(n_heads=4)
    heads.setup(model)
    prompts = [[1, 2, 3], [3, 0, 1, 2], [2]]
    dec = Medusa(heads=heads)
    assert dec.generate(model, prompts, max_new_tokens=40) == Greedy().generate(model, prompts, max_new_tokens=40)


@pytest.mark.parametrize("block", ["dense", "mamba2", "hybrid"])
def test_batched_drafting_decoders_on_cuda_equal_greedy(block):
    """Batched speculative, EAGLE and Medusa decoding (row states, per-row rollback) and
    EAGLE-2's dynamic tree give greedy's tokens on the GPU."""
    from llmzoo_plugins.eagle import Eagle, EagleObjective
    from llmzoo_plugins.medusa import Medusa, MedusaObjective
    from llmzoo_plugins.sampling import Greedy
    from llmzoo_plugins.speculative import Speculative

    model = _model(block, vocab=8)
    prompts = [[1, 2, 3], [3, 0, 1, 2], [5, 6, 7, 1, 1], [4, 4]]
    ref = Greedy().generate(model, prompts, max_new_tokens=24)
    eagle, medusa = EagleObjective(), MedusaObjective(n_heads=4)
    eagle.setup(model), medusa.setup(model)
    decoders = [Speculative(k=3, draft_layers=1), Eagle(head=eagle, k=3), Medusa(heads=medusa.cuda())]
    if block == "dense":
        decoders.append(Eagle(head=eagle, k=3, draft="tree"))
    for dec in decoders:
        assert dec.generate(model, prompts, max_new_tokens=24) == ref, type(dec).__name__
