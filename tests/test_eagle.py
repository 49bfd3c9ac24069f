"""EAGLE: the draft head's loss against its formula, greedy EAGLE equals greedy for every
block, the objective contract, and a head trained through the CLI that drafts well."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import llmzoo
from conftest import FAST, run_cli, tiny_cfg
from llmzoo.config import ConfigError
from llmzoo.testing import check_objective
from llmzoo_plugins.eagle import Eagle, EagleObjective
from llmzoo_plugins.sampling import Greedy


def random_model(block: str, vocab: int, seed: int = 0):
    cfg = tiny_cfg(f"block={block}", f"model.vocab_size={vocab}")
    torch.manual_seed(seed)
    return llmzoo.build_model(cfg).eval()


def test_eagle_loss_is_feature_regression_plus_weighted_cross_entropy_to_the_target():
    model = random_model("dense", 64)
    obj = EagleObjective(cls_weight=0.3)
    obj.setup(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    loss = obj.loss(out, {"input_ids": ids})
    f, total = out.hidden, 0.0
    pred = obj.head.block(obj.head.fc(torch.cat([f[:, :-1], model.embedding(ids[:, 1:])], -1)))
    huber = torch.where((pred - f[:, 1:]).abs() < 1, 0.5 * (pred - f[:, 1:]) ** 2, (pred - f[:, 1:]).abs() - 0.5).mean()
    p = torch.softmax(out.logits[:, 1:], -1)
    for b in range(2):  # the cross-entropy one position at a time
        for t in range(11):
            total += -(p[b, t] * torch.log_softmax(model.head(pred[b, t]), -1)).sum()
    want = huber + 0.3 * total / 22
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-5)
    loss.value.backward()
    assert all(p.grad is None for p in model.parameters())  # the target is frozen
    assert obj.head.fc.weight.grad is not None and torch.isfinite(obj.head.fc.weight.grad).all()
    fresh, target = EagleObjective(), random_model("dense", 64)
    fresh.setup(target)
    check_objective(fresh, target, {"input_ids": ids})


@pytest.mark.parametrize("block,vocab", [("dense", 64), ("moe", 64), ("dense", 8), ("mamba2", 8), ("hybrid", 8)])
def test_greedy_eagle_equals_greedy(block, vocab):
    model = random_model(block, vocab)
    obj = EagleObjective()
    obj.setup(model)
    prompts = [[1, 2, 3], [3, 0, 1, 2], [2], [5, 6, 7, 1, 1]]
    dec = Eagle(head=obj, k=3)
    ref = Greedy().generate(model, prompts, max_new_tokens=30, eos_id=7)
    assert dec.generate(model, prompts, max_new_tokens=30, eos_id=7) == ref  # row by row (a 1-token prompt)
    if vocab == 8 and block != "mamba2":  # repetitive random models: some drafts are accepted
        assert dec.stats["accepted_per_step"] > 1.0
    longer = [p for p in prompts if len(p) > 1]  # the batched path: rows accept different counts
    assert dec.generate(model, longer, max_new_tokens=30, eos_id=7) == [r for p, r in zip(prompts, ref) if len(p) > 1]
    assert 1.0 <= dec.stats["accepted_per_step"] <= 4


@pytest.mark.parametrize("block,vocab", [("dense", 8), ("dense", 64), ("moe", 8)])
def test_greedy_eagle_dynamic_tree_equals_greedy(block, vocab):
    """EAGLE-2's dynamic draft tree (tree masks on the head's and the target's caches,
    the deepest accepted path kept) gives greedy's tokens, 1-token prompts included."""
    model = random_model(block, vocab)
    obj = EagleObjective()
    obj.setup(model)
    prompts = [[1, 2, 3], [3, 0, 1, 2], [2], [5, 6, 7, 1, 1]]
    ref = Greedy().generate(model, prompts, max_new_tokens=30, eos_id=7)
    dec = Eagle(head=obj, k=3, draft="tree", width=3, budget=8)
    assert dec.generate(model, prompts, max_new_tokens=30, eos_id=7) == ref
    assert 1.0 <= dec.stats["accepted_per_step"] <= 4
    if vocab == 8 and block == "dense":  # repetitive random model: some drafts are accepted
        assert dec.stats["accepted_per_step"] > 1.0
    with pytest.raises(ValueError, match="decoder.draft='fan' is not one of"):
        Eagle(draft="fan")


@pytest.mark.parametrize("block", ["dense", "moe"])
def test_greedy_eagle_compiled_verify_equals_greedy(block):
    """decoder.compile=true: the target verifies over static KV caches (rewound in place)
    with a compiled forward (dynamo's capture, fullgraph): greedy's tokens, one graph per
    token count at most, none new on a second call."""
    from torch._dynamo.utils import counters

    model = random_model(block, 8)
    obj = EagleObjective()
    obj.setup(model)
    prompts = [[1, 2, 3], [3, 0, 1, 2], [2], [5, 6, 7, 1, 1]]
    ref = Greedy().generate(model, prompts, max_new_tokens=30, eos_id=7)
    dec = Eagle(head=obj, k=3, compile=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    assert dec.generate(model, prompts, max_new_tokens=30, eos_id=7) == ref
    graphs = counters["stats"]["unique_graphs"]
    assert dec.generate(model, prompts, max_new_tokens=30, eos_id=7) == ref
    assert counters["stats"]["unique_graphs"] == graphs <= 4, graphs
    assert dec.stats["compile_s"] > 0
    if block == "dense":  # this random model repeats itself: drafts get accepted, several token counts run
        assert dec.stats["accepted_per_step"] > 1.0
    with pytest.raises(ValueError, match="static KV caches that rewind"):
        Eagle(head=obj, compile=True).generate(random_model("mamba2", 8), [[1, 2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="draft=chain"):
        Eagle(compile=True, draft="tree")


def test_eagle_decoder_needs_an_eagle_run():
    with pytest.raises(ConfigError, match="decoder=eagle drafts with the head that objective=eagle trains"):
        tiny_cfg("decoder=eagle")
    with pytest.raises(ValueError, match="decoder.k must be >= 1"):
        Eagle(k=0)


@pytest.mark.slow  # ~57 s of training, like its Medusa twin; benchmarks/decode.py measures acceptance too
def test_eagle_head_trained_on_a_pretrained_run_drafts_well(tmp_path, pretrained):
    """Pretrain, train the head (init_from, target frozen), decode through the CLI: the same
    text as greedy, more than one token per target forward."""
    pre, eagle = pretrained("dense", 300), tmp_path / "eagle"
    run_cli("llmzoo-train", f"run_dir={eagle}", "objective=eagle", f"init_from={pre}", "trainer.max_steps=150", *FAST)
    prompts = '["Once upon a time","The little fox","12 + 7 ="]'
    greedy = run_cli("llmzoo-generate", f"run_dir={eagle}", "max_new_tokens=60", f"prompts={prompts}")
    drafted = run_cli("llmzoo-generate", f"run_dir={eagle}", "max_new_tokens=60", f"prompts={prompts}", "decoder=eagle")
    assert drafted.stdout == greedy.stdout
    accepted = float(re.search(r"accepted per step ([0-9.]+)", drafted.stderr).group(1))
    print(f"EAGLE mean accepted tokens per step: {accepted:.2f}")
    assert accepted > 1.5
    base, run = llmzoo.load_run(pre), llmzoo.load_run(eagle)
    for (name, a), b in zip(base.model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), f"the target changed: {name}"
