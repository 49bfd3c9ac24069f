"""Decoders against repeated full forwards (no state), and the sampling filters
against a direct computation."""

import pytest
import torch

import llmzoo
from llmzoo_plugins.sampling import Greedy, Sample, filter_logits

PROMPTS = [[5, 17, 99, 3], [42], [7, 7, 7, 7, 7, 7, 7, 200], [1, 2]]


@pytest.fixture(scope="module")
def model():
    cfg = llmzoo.compose(overrides=["model=tiny"])
    torch.manual_seed(0)
    m = llmzoo.build_model(cfg).eval()
    with torch.no_grad():  # sharpen the random model a little so sampling is not uniform
        m.head.weight.mul_(20)
    return m


def full_forward_generate(model, prompt, n, choose, eos_id=None):
    """The slow, obvious way: re-run the whole sequence for every new token."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[:, -1]
        tok = int(choose(logits.float())[0])
        out.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return out


def test_greedy_equals_repeated_full_forward_for_ragged_batch(model):
    got = Greedy().generate(model, PROMPTS, max_new_tokens=12)
    for p, g in zip(PROMPTS, got):
        assert g == full_forward_generate(model, p, 12, lambda x: x.argmax(-1))


def test_sample_with_seed_equals_full_forward_sampling(model):
    """Per-row sampling with one generator per row equals the same draws made on full forwards."""
    dec = Sample(temperature=0.9, top_k=40, top_p=0.9, seed=123)
    for p in PROMPTS:  # batch of one: the draws of one generator line up with the slow loop
        got = dec.generate(model, [p], max_new_tokens=10)[0]
        g = torch.Generator().manual_seed(123)
        ref = full_forward_generate(
            model, p, 10,
            lambda x: torch.multinomial(filter_logits(x / 0.9, 40, 0.9).softmax(-1), 1, generator=g)[:, 0])
        assert got == ref
    assert dec.generate(model, PROMPTS, max_new_tokens=10) == dec.generate(model, PROMPTS, max_new_tokens=10)


def test_stops_at_eos_and_max_new_tokens(model):
    first = Greedy().generate(model, PROMPTS, max_new_tokens=6)
    eos = first[0][2]  # pretend the third generated token of row 0 is eos
    got = Greedy().generate(model, PROMPTS, max_new_tokens=6, eos_id=eos)
    assert got[0] == first[0][:3]
    for row, full in zip(got, first):
        assert row == (full[: full.index(eos) + 1] if eos in full else full)
    assert all(len(r) <= 6 for r in got)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert keep == [True, True, False, False, False]
    # top_p=0.8: 0.5 + 0.2 = 0.7 < 0.8, adding 0.15 reaches 0.85 -> keep three
    keep = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert keep == [True, True, True, False, False]
    keep = torch.isfinite(filter_logits(logits[:, [3, 0, 4, 2, 1]], top_p=0.5))[0].tolist()
    assert keep == [False, True, False, False, False]


def test_sampling_distribution_matches_softmax():
    """Draws from the Sample decoder follow softmax(logits / T) (chi-square, alpha = 0.001)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    dec = Sample(temperature=0.7, seed=0)
    n = 20000
    draws = dec.sampler(logits.expand(n, -1))
    counts = torch.bincount(draws, minlength=4).double()
    expected = (logits[0] / 0.7).softmax(-1).double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27, (counts, expected)  # chi-square 3 dof, p = 0.001


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        Sample(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sample(top_p=1.5)
