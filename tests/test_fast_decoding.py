"""Fast decoders against plain greedy decoding and full forwards (the references),
speculative sampling against the target's exact distribution, quantized logits
against float ones."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from scipy.stats import chisquare

import llmzoo
from conftest import FAST, run_cli, tiny_cfg, train_run
from llmzoo.api import build_model
from llmzoo.config import ConfigError
from llmzoo_plugins.medusa import Medusa, MedusaObjective, Tree
from llmzoo_plugins.quantize import Int4Linear, Int8Linear, Quantize, load_quantized, save_quantized
from llmzoo_plugins.sampling import Greedy
from llmzoo_plugins.speculative import Speculative
from llmzoo_plugins.static_cache import StaticCache
from llmzoo.losses import run_objective

PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11], [3, 3, 3, 3, 3, 3, 3, 3]]


def random_model(block: str, vocab: int = 64, seed: int = 0, *extra: str):
    cfg = tiny_cfg(f"block={block}", f"model.vocab_size={vocab}", *extra)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


# ----------------------------------------------------------------------------- static cache + compile
def _compiled_once(decoder, model, prompts, n):
    """Two generate calls with recompilation made an error; returns both outputs and the
    number of graphs dynamo compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = decoder.generate(model, prompts, max_new_tokens=n)
        second = decoder.generate(model, prompts, max_new_tokens=n)
    return first, second, counters["stats"]["unique_graphs"]


@pytest.mark.slow  # ~19 s of inductor compiles; the default run compiles Medusa's tree step with inductor
def test_static_cache_inductor_compiles_once_and_equals_greedy():
    model = random_model("dense")
    ref = Greedy().generate(model, PROMPTS, max_new_tokens=24)
    first, second, graphs = _compiled_once(StaticCache(backend="inductor"), model, PROMPTS, 24)
    assert first == ref and second == ref
    assert graphs == 1


@pytest.mark.parametrize("block", ["moe", "mamba", "mamba2", "hybrid"])
def test_static_cache_step_is_one_graph_for_every_block(block):
    """fullgraph=True with dynamo's graph capture only (backend=eager, fast): the decode
    step of each block traces without breaks, never recompiles, and gives greedy's tokens."""
    model = random_model(block)
    ref = Greedy().generate(model, PROMPTS, max_new_tokens=16)
    first, second, graphs = _compiled_once(StaticCache(backend="eager"), model, PROMPTS, 16)
    assert first == ref and second == ref
    assert graphs == 1


def test_static_cache_sampling_equals_plain_sampling_with_the_same_seed():
    from llmzoo_plugins.sampling import Sample

    model = random_model("dense")
    ref = Sample(temperature=0.9, top_k=20, seed=3).generate(model, PROMPTS, max_new_tokens=12)
    got = StaticCache(compile=False, temperature=0.9, top_k=20, seed=3).generate(model, PROMPTS, max_new_tokens=12)
    assert got == ref


# ----------------------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("block", ["dense", "mamba", "hybrid"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_greedy_equals_greedy(block, k):
    model = random_model(block)
    ref = Greedy().generate(model, PROMPTS, max_new_tokens=30)
    dec = Speculative(k=k, draft_layers=1)
    assert dec.generate(model, PROMPTS, max_new_tokens=30) == ref
    assert 1.0 <= dec.stats["accepted_per_step"] <= k + 1


@pytest.mark.parametrize("target_block,draft_block", [("dense", "mamba"), ("mamba2", "dense"), ("hybrid", "moe")])
def test_speculative_greedy_with_a_separate_draft_model_and_eos(target_block, draft_block):
    """A batch (row states: rows accept different counts and leave when done) and each
    prompt alone both give greedy's tokens; recurrent states roll back from per-token copies."""
    target, draft = random_model(target_block, 16, 0), random_model(draft_block, 16, 1)
    ref = Greedy().generate(target, PROMPTS, max_new_tokens=25, eos_id=5)
    dec = Speculative(k=3, draft=draft)
    assert dec.generate(target, PROMPTS, max_new_tokens=25, eos_id=5) == ref
    batched = dec.stats
    assert [dec.generate(target, [p], max_new_tokens=25, eos_id=5)[0] for p in PROMPTS] == ref
    assert 1.0 <= batched["accepted_per_step"] <= 4 and batched["steps"] >= sum(map(len, ref)) / 4


@pytest.mark.parametrize("draft", ["layers", "moe"])
def test_speculative_compiled_equals_greedy_with_one_graph_per_token_count(draft):
    """decoder.compile=true: static KV caches rewound in place, the target's verify forward
    and the draft's step compiled (dynamo's capture: backend=eager, fullgraph) -- greedy's
    tokens, at most one graph per token count (k + 1 .. 1 for the target, 1 and 2 for the
    draft), and none new on a second call."""
    from torch._dynamo.utils import counters

    target = random_model("dense", 16, 0)
    kw = {"draft_layers": 1} if draft == "layers" else {"draft": random_model("moe", 16, 1)}
    ref = Greedy().generate(target, PROMPTS, max_new_tokens=25, eos_id=5)
    dec = Speculative(k=3, compile=True, backend="eager", **kw)
    torch._dynamo.reset()
    counters.clear()
    assert dec.generate(target, PROMPTS, max_new_tokens=25, eos_id=5) == ref
    graphs = counters["stats"]["unique_graphs"]
    assert dec.stats["accepted_per_step"] > 1.0 and dec.stats["compile_s"] > 0
    assert dec.generate(target, PROMPTS, max_new_tokens=25, eos_id=5) == ref
    assert counters["stats"]["unique_graphs"] == graphs <= 4 + 2, graphs


def test_compiled_drafting_decoders_are_refused_at_config_time_on_recurrent_blocks():
    with pytest.raises(ConfigError, match="lacks \\['tree_mask'\\]"):
        tiny_cfg("block=mamba2", "objective=medusa", "decoder=medusa", "decoder.compile=true")
    with pytest.raises(ConfigError, match="lacks \\['kv_cache'\\]"):
        tiny_cfg("block=mamba2", "decoder=speculative", "decoder.compile=true")
    tiny_cfg("block=moe", "decoder=speculative", "decoder.compile=true")  # KV caches: accepted


def test_speculative_compile_needs_kv_cache_blocks():
    with pytest.raises(ValueError, match="static KV caches"):
        Speculative(k=2, draft_layers=1, compile=True).generate(random_model("mamba2"), [[1, 2]], max_new_tokens=4)


@pytest.mark.parametrize("batched", [False, True])
def test_speculative_sampling_reproduces_the_target_distribution(batched):
    """Joint distribution of two sampled tokens over a 4-token vocabulary, with a draft
    that disagrees strongly with the target; chi-square goodness of fit at alpha = 0.001
    (cells with an expected count below 5 pooled). Batched: the n samples are the rows of
    one generate call (row states, each row accepting its own count)."""
    target = random_model("dense", 4, 0, "model.init_std=0.5")
    draft = random_model("dense", 4, 1, "model.init_std=0.5")
    prompt = [1, 2]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        q1 = draft(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        joint = torch.stack([p1[a] * target(torch.tensor([prompt + [a]])).logits[0, -1].softmax(-1)
                             for a in range(4)]).flatten().double()
    assert (p1 - q1).abs().sum() > 0.5  # the draft is a poor guess: rejections happen
    n = 1500
    counts = torch.zeros(16, dtype=torch.float64)
    if batched:
        samples = Speculative(k=2, draft=draft, temperature=1.0, seed=0).generate(target, [prompt] * n, max_new_tokens=2)
    else:
        samples = [Speculative(k=2, draft=draft, temperature=1.0, seed=i).generate(target, [prompt], max_new_tokens=2)[0]
                   for i in range(n)]
    for a, b in samples:
        counts[a * 4 + b] += 1
    expected = joint * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    exp = exp * obs.sum() / exp.sum()
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


# ----------------------------------------------------------------------------- Medusa
def test_tree_forward_equals_a_full_forward_of_every_path():
    """One forward over the candidate tree (tree mask + positions by depth) gives, at every
    node, the logits of a plain forward over prompt + that node's path."""
    model = random_model("dense")
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    prompt = [3, 1, 4, 1, 5]
    tokens = [9, 20, 21, 30, 31, 32, 40]  # root + one token per node
    states = model.init_states(1, 32)
    with torch.no_grad():
        model(torch.tensor([prompt]), states=states)
        for s in states:
            s.tree = tree.mask
        got = model(torch.tensor([tokens]), states=states).logits[0]
        for i in range(len(tree)):
            path = [tokens[0]] + [tokens[j] for j in tree.path_to(i)]
            want = model(torch.tensor([prompt + path])).logits[0, -1]
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_tree_forward_over_row_states_equals_a_full_forward_of_every_path():
    """The same with rows=True states: rows at different positions verify their own
    candidates under one tree in one forward, and ``keep`` with per-row starts leaves each
    row exactly its kept path (the next token's logits equal a plain forward's)."""
    from llmzoo.shared.decoding import RowStreams

    model = random_model("moe")
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    prompts = [[3, 1, 4, 1, 5], [2, 7], [6, 6, 6, 6, 6, 6, 6, 6]]
    tokens = [[9, 20, 21, 30, 31, 32, 40], [8, 22, 23, 33, 34, 35, 41], [7, 24, 25, 36, 37, 38, 42]]
    with torch.no_grad():
        streams = RowStreams(model, prompts, 40, "cpu")
        for s in streams.states:
            s.tree = tree.mask
        got = model(torch.tensor(tokens), states=streams.states).logits
        for b, prompt in enumerate(prompts):
            for i in range(len(tree)):
                path = [tokens[b][0]] + [tokens[b][j] for j in tree.path_to(i)]
                want = model(torch.tensor([prompt + path])).logits[0, -1]
                torch.testing.assert_close(got[b, i], want, atol=1e-5, rtol=1e-5)
        kept = [torch.tensor([0] + tree.path_to(n)) for n in (6, 2, 0)]  # rows keep 4, 2 and 1 tokens
        for s in streams.states:
            s.keep([len(p) for p in prompts], kept)
        nxt = model(torch.tensor([[11], [12], [13]]), states=streams.states).logits[:, -1]
        for b, prompt in enumerate(prompts):
            seq = prompt + [tokens[b][j] for j in kept[b].tolist()] + [11 + b]
            torch.testing.assert_close(nxt[b], model(torch.tensor([seq])).logits[0, -1], atol=1e-5, rtol=1e-5)


def _random_heads(model, seed=0):
    obj = MedusaObjective(n_heads=4)
    obj.setup(model)
    torch.manual_seed(seed)
    for h in obj.heads:  # heads that guess often wrong and sometimes right
        torch.nn.init.normal_(h.res.weight, 0, 0.3)
    return obj


SMALL_VOCAB_PROMPTS = [[1, 2, 3], [3, 0, 1, 2], [2]]  # vocab 8: random models repeat, so guesses get accepted


@pytest.mark.parametrize("block,verify,vocab", [("dense", "auto", 64), ("moe", "auto", 64), ("dense", "rows", 8),
                                                ("mamba", "auto", 8), ("mamba2", "auto", 8), ("hybrid", "auto", 8)])
def test_medusa_greedy_equals_greedy(block, verify, vocab):
    """Each prompt alone -- tree verification (dense, MoE) or rows verification (any block;
    auto for the recurrent ones) -- and the whole batch at once (every batch row times
    every path, rows at their own positions) all give exactly greedy's tokens."""
    model = random_model(block, vocab)
    prompts = PROMPTS if vocab == 64 else SMALL_VOCAB_PROMPTS
    eos = 7 if vocab == 64 else None  # (in a vocabulary of 8, an eos would end the rows early)
    ref = Greedy().generate(model, prompts, max_new_tokens=40, eos_id=eos)
    dec = Medusa(heads=_random_heads(model), verify=verify)
    alone, steps = [], 0
    for p in prompts:
        alone.append(dec.generate(model, [p], max_new_tokens=40, eos_id=eos)[0])
        steps += dec.stats["steps"]
    assert alone == ref
    assert sum(map(len, alone)) - len(prompts) > steps  # some guesses accepted: the multi-token paths ran
    assert dec.generate(model, prompts, max_new_tokens=40, eos_id=eos) == ref
    assert dec.stats["accepted_per_step"] > 1.0 and dec.stats["steps"] >= sum(map(len, ref)) / 5


@pytest.mark.parametrize("block,backend", [("dense", "inductor"), ("moe", "eager")])
def test_medusa_compiled_tree_step_is_one_graph_and_equals_greedy(block, backend):
    """decoder.compile=true: the tree verify step over static states (tree masks and keep in
    fixed shapes) compiles to one graph that never recompiles -- across prompts, positions
    and accepted paths -- and gives exactly greedy's tokens (eager MoE: dynamo's capture only)."""
    model = random_model(block)
    ref = Greedy().generate(model, PROMPTS, max_new_tokens=40, eos_id=7)
    dec = Medusa(heads=_random_heads(model), compile=True, backend=backend)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = dec.generate(model, PROMPTS, max_new_tokens=40, eos_id=7)
        second = dec.generate(model, PROMPTS, max_new_tokens=40, eos_id=7)
    assert first == ref and second == ref
    assert counters["stats"]["unique_graphs"] == 1
    assert dec.stats["accepted_per_step"] > 1.0 and dec.stats["compile_s"] > 0


def test_medusa_compile_needs_tree_mask_blocks():
    model = random_model("mamba2", 8)
    with pytest.raises(ValueError, match="tree_mask and static_state"):
        Medusa(heads=_random_heads(model), compile=True).generate(model, [[1, 2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="verify=auto or tree"):
        Medusa(compile=True, verify="rows")


def test_medusa_rows_verification_keeps_or_refeeds_the_state():
    """Rows mode on a hybrid stack (attention + Mamba-2): steps that accept a whole path
    keep that row's state, the others feed the accepted tokens again from the state before
    the step; both kinds occur and the tokens stay greedy's."""
    model = random_model("hybrid", 4)
    dec, kept, refed = Medusa(heads=_random_heads(model)), 0, 0
    for prompt in SMALL_VOCAB_PROMPTS:  # one at a time (a batch verifies through RowStreams)
        assert dec.generate(model, [prompt], max_new_tokens=40) == Greedy().generate(model, [prompt], max_new_tokens=40)
        kept, refed = kept + dec.stats.get("rows_state_kept", 0), refed + dec.stats.get("rows_state_refed", 0)
    assert kept > 0 and refed > 0


def test_medusa_typical_acceptance_runs_and_is_seeded():
    model = random_model("dense")
    dec = Medusa(heads=_random_heads(model), temperature=0.8, seed=1)
    a = dec.generate(model, PROMPTS, max_new_tokens=20)
    assert a == dec.generate(model, PROMPTS, max_new_tokens=20)
    assert all(len(o) == 20 for o in a)


def test_medusa_loss_is_the_weighted_shifted_cross_entropy():
    model = random_model("dense")
    obj = _random_heads(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = run_objective(model, obj, {"input_ids": ids})
    hidden = model(ids).hidden
    want = 0.0
    for k, head in enumerate(obj.heads, start=1):  # head k at t predicts t + k + 1
        logits = head(hidden)[:, : 24 - k - 1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, k + 1:].reshape(-1))
        want = want + 0.8 ** k * ce
    torch.testing.assert_close(loss.value, want)
    loss.value.backward()  # Medusa-1: the base model gets no gradient
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in obj.heads.parameters())


def test_medusa2_trains_the_base_with_weighted_heads():
    model = random_model("dense")
    obj = MedusaObjective(n_heads=2, freeze_base=False, heads_weight=0.2)
    obj.setup(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = run_objective(model, obj, {"input_ids": ids})
    base = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    heads = sum(0.8 ** k * loss.metrics[f"medusa{k}_ce"] for k in (1, 2))
    torch.testing.assert_close(loss.value, base + 0.2 * heads)
    loss.value.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_medusa_on_mamba_composes_with_rows_verification():
    cfg = tiny_cfg("block=mamba", "decoder=medusa", "objective=medusa")  # compose validates
    assert cfg.decoder.verify == "auto"
    with pytest.raises(ValueError, match="decoder.verify='paths' is not one of"):
        Medusa(verify="paths")


@pytest.mark.slow  # ~50 s of training; benchmarks/decode.py measures acceptance too
def test_medusa_heads_trained_on_the_corpus_accept_more_than_1_5_tokens_per_step(tmp_path, pretrained):
    """Pretrain the tiny model, train Medusa-1 heads on it (init_from), decode through the CLI."""
    pre, med = pretrained("dense", 300), tmp_path / "medusa"
    run_cli("llmzoo-train", f"run_dir={med}", "objective=medusa", f"init_from={pre}", "trainer.max_steps=120", *FAST)
    prompts = '["Once upon a time","The little fox","12 + 7 =","Ada and Otto"]'
    greedy = run_cli("llmzoo-generate", f"run_dir={med}", "max_new_tokens=80", f"prompts={prompts}")
    medusa = run_cli("llmzoo-generate", f"run_dir={med}", "max_new_tokens=80", f"prompts={prompts}", "decoder=medusa")
    assert medusa.stdout == greedy.stdout
    accepted = float(re.search(r"accepted per step ([0-9.]+)", medusa.stderr).group(1))
    print(f"Medusa mean accepted tokens per step: {accepted:.2f}")
    assert accepted > 1.5
    # the base model is untouched by Medusa-1 training
    a, b = llmzoo.load_run(pre).model.state_dict(), llmzoo.load_run(med).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_medusa_decoder_needs_a_medusa_run(tmp_path):
    llmzoo.train(llmzoo.compose(overrides=[f"run_dir={tmp_path}", "trainer.max_steps=2", "trainer.val_every=0", *FAST]))
    out = run_cli("llmzoo-generate", f"run_dir={tmp_path}", "decoder=medusa", check=False)
    assert out.returncode != 0 and "objective=medusa" in out.stderr


# ----------------------------------------------------------------------------- quantization
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("q") / "run"  # dim=128: int4 (per group of inputs) holds within 10 % here
    train_run(f"run_dir={run}", "trainer.max_steps=200", "model.dim=128", "model.n_heads=4", *FAST)
    return run


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.10)])
def test_quantized_logits_stay_close_and_generation_runs(trained, mode, tol):
    """Max |logit difference| relative to the largest |logit|: int8 <= 2 %, int4 <= 10 %
    (trained tiny model, bundled corpus text)."""
    model = llmzoo.load_run(trained).model
    tok = llmzoo.load_run(trained).tokenizer
    ids = torch.tensor([tok.encode("Once upon a time, the little fox went to the river.")])
    quantized = Quantize(mode)(copy.deepcopy(model))
    with torch.no_grad():
        ref, got = model(ids).logits, quantized(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{mode}: max logit error {rel:.4f} of the largest logit")
    assert 0 < rel <= tol
    layer = Int8Linear if mode == "int8" else Int4Linear
    assert any(isinstance(m, layer) for m in quantized.modules())
    out = Greedy().generate(quantized, [ids[0, :8].tolist()], max_new_tokens=20)
    assert len(out[0]) == 20


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_kernels_equal_the_dequantize_reference(mode):
    lin = torch.nn.Linear(64, 96, bias=True)
    x = torch.randn(3, 5, 64)
    fast = Quantize(mode)(torch.nn.Sequential(copy.deepcopy(lin)))[0]
    ref = Quantize(mode, reference=True)(torch.nn.Sequential(copy.deepcopy(lin)))[0]
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    # and the reference is the formula: w ~ q * s (int8) or (q - 8) * s + z (int4)
    err = (ref.dequantized() - lin.weight).abs().max()
    step = lin.weight.abs().max() / (127 if mode == "int8" else 7)
    assert err <= step


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_save_and_load(tmp_path, mode):
    model = random_model("dense", 64, 0, "model.dim=64")
    quantized = Quantize(mode)(copy.deepcopy(model))
    save_quantized(quantized, tmp_path / "q.safetensors")
    loaded = load_quantized(random_model("dense", 64, 5, "model.dim=64"), tmp_path / "q.safetensors")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)


def test_generate_cli_quantizes_and_reuses_saved_weights(trained):
    first = run_cli("llmzoo-generate", f"run_dir={trained}", "quantize=int8", "save_quantized=true",
                    "max_new_tokens=20")
    assert (trained / "model-int8.safetensors").exists() and "saved" in first.stderr
    second = run_cli("llmzoo-generate", f"run_dir={trained}", "quantize=int8", "max_new_tokens=20")
    assert "loading quantized weights" in second.stderr and second.stdout == first.stdout


def test_medusa_typical_acceptance_equals_the_papers_rule_on_fixed_distributions():
    """Medusa's typical acceptance (Cai et al. 2024, eq. in section 2.3.1): a guess x is
    accepted when p(x) > min(epsilon, delta * exp(-H(p))), computed here independently with
    ``math`` on fixed distributions; a node is accepted when every guess on its path is."""
    import math

    from llmzoo.shared.decoding import ancestor_mask

    dec = Medusa(heads=None, temperature=1.0, seed=0, posterior_threshold=0.09, posterior_alpha=0.3)
    flat = [0.3, 0.25, 0.2, 0.15, 0.1]  # high entropy: the threshold is delta * exp(-H) < epsilon
    peaked = [0.9, 0.04, 0.03, 0.02, 0.01]  # low entropy: the threshold is epsilon
    for p in (flat, peaked):
        h = -sum(q * math.log(q) for q in p)
        threshold = min(0.09, 0.3 * math.exp(-h))
        want = [q > threshold for q in p]
        got = dec._good(torch.tensor([p] * len(p)), torch.arange(len(p))).tolist()
        assert got == want, (p, threshold, got)
    assert dec._good(torch.tensor(flat), torch.tensor(4)).item() is True  # 0.1 > 0.3 * e^-H = 0.064
    assert dec._good(torch.tensor(peaked), torch.tensor(1)).item() is False  # 0.04 < min(0.09, 0.21)
    # a tree: root 0 -> node 1 -> node 2, and node 3 a sibling of node 1; the distributions
    # at each node's parent judge its guess
    parents = [-1, 0, 1, 0]
    probs = torch.tensor([flat, peaked, flat, flat])  # at nodes 0..3
    nodes = torch.tensor([0, 4, 0, 1])  # guesses: node 1 guesses 4 (0.1 under flat: kept)
    mask = ancestor_mask(parents)
    accepted = dec._accepted(probs, nodes, torch.tensor([0, 0, 1, 0]), mask).tolist()
    # node 2 guesses 0 under node 1's peaked distribution (0.9: kept); node 3 guesses 1 under flat (0.25)
    assert accepted == [True, True, True, True]
    nodes = torch.tensor([0, 4, 1, 1])  # node 2 now guesses 1 under peaked (0.04: refused)
    assert dec._accepted(probs, nodes, torch.tensor([0, 0, 1, 0]), mask).tolist() == [True, True, False, True]
