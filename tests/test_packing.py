"""Packing with document boundaries (data.packing=document): every built-in block gives each
document of a packed row what it gives alone, objectives give the loss and gradients of the
same samples unpacked, the data modules pack and label as documented, and configs that cannot
keep documents apart are refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from conftest import tiny_cfg
from llmzoo.interfaces import IGNORE_INDEX, PACKED, Segments, capabilities_of
from llmzoo.testing import check_packed


# ----------------------------------------------------------------------------- blocks
BLOCKS = [
    ("dense", []), ("dense", ["block.backend=reference"]), ("dense", ["+block.sliding_window=3"]),
    ("moe", []), ("mamba", []), ("mamba", ["block.backend=reference"]), ("mamba2", []),
    ("mamba2", ["block.chunk_size=4"]),  # documents that start inside and across chunks
    ("mamba2", ["block.backend=reference"]), ("hybrid", []),
]


@pytest.mark.parametrize("block,extra", BLOCKS, ids=[" ".join([b, *e]) for b, e in BLOCKS])
def test_builtin_blocks_keep_packed_documents_apart(block, extra):
    cfg = tiny_cfg(f"block={block}", *extra)
    for layer in range(2):  # hybrid: an attention layer and a Mamba-2 layer
        torch.manual_seed(layer)
        b = instantiate(cfg.block, layer_idx=layer, _convert_="all")
        assert PACKED in capabilities_of(b)
        check_packed(b, cfg.model.dim)


def test_check_packed_catches_a_block_that_leaks_across_documents():
    """A mixer that ignores the boundaries (a cumulative mean over the row) fails the check."""

    class Leaky(torch.nn.Module):
        capabilities = frozenset({PACKED})

        def forward(self, x, *, state=None, segments=None):
            return x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]

    with pytest.raises(AssertionError, match="differs from the document alone"):
        check_packed(Leaky(), 8)


def test_segments_positions_restart_at_each_document():
    seg = Segments.of(torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]]))
    assert seg.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = seg.mask()[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert bool(mask.diagonal().all())  # every token sees itself: no empty softmax row


def test_moe_aux_losses_count_real_tokens_only():
    from llmzoo_plugins.moe import MoE

    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2).train()
    x = torch.randn(1, 10, 16)
    moe(x[:, :7])
    real_only = moe.aux_loss()
    moe(x, segments=Segments.of(torch.tensor([[0] * 4 + [1] * 3 + [-1] * 3])))
    assert torch.allclose(moe.aux_loss(), real_only, atol=1e-6)


@pytest.mark.slow
def test_flex_attention_block_mask_matches_the_dense_mask():
    """flex_attention with the per-batch block mask (compiled: ~25 s on this CPU, forward only --
    its backward does not run on CPU) equals SDPA with the dense document mask."""
    from llmzoo_plugins.attention import attention_packed

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 16) for _ in range(3))
    doc = torch.randint(0, 5, (2, 128)).sort(1).values
    seg = Segments.of(doc)
    with torch.no_grad():
        for window in (None, 7):
            dense = attention_packed("sdpa", q, k, v, seg, window)
            flex = attention_packed("flex", q, k, v, seg, window)
            assert (dense - flex).abs().max() < 1e-5


# ----------------------------------------------------------------------------- objectives
def _docs(lengths, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block", ["dense", "mamba2"])
@pytest.mark.parametrize("objective", ["clm", "sft"])
def test_packed_batch_gives_the_loss_and_gradients_of_the_samples_unpacked(block, objective):
    """Documents (with prompt tokens unlabelled for sft) in one packed row vs one padded row
    each: same mean loss over the same labelled tokens, same gradients."""
    from llmzoo.api import build_model, build_objective
    from llmzoo.losses import run_objective

    cfg = tiny_cfg(f"block={block}", f"objective={objective}")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=40)
    obj = build_objective(cfg, model)
    docs = _docs([6, 11, 4, 9])
    labels = [d.clone() for d in docs]
    for lab in labels:
        lab[0] = IGNORE_INDEX  # never a target (a document's first token)
        if objective == "sft":
            lab[1:3] = IGNORE_INDEX  # the "prompt"
    T = max(len(d) for d in docs)
    padded = {"input_ids": torch.zeros(len(docs), T, dtype=torch.long),
              "labels": torch.full((len(docs), T), IGNORE_INDEX)}
    for i, (d, lab) in enumerate(zip(docs, labels)):
        padded["input_ids"][i, :len(d)], padded["labels"][i, :len(d)] = d, lab
    packed = {"input_ids": torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None],
              "labels": torch.cat(labels + [torch.full((3,), IGNORE_INDEX)])[None],
              "doc_ids": torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((3,), -1)])[None]}
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        loss = run_objective(model, obj, batch).value
        loss.backward()
        losses.append(loss.detach()), grads.append(_grads(model))
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_an_objective_with_its_own_inputs_refuses_packed_rows():
    from llmzoo.api import build_model, build_objective
    from llmzoo.losses import run_objective

    cfg = tiny_cfg("objective=dpo", "data=preferences")
    model = build_model(cfg, vocab_size=40)
    batch = {"chosen_input_ids": torch.ones(1, 4, dtype=torch.long), "doc_ids": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="cannot take packed rows"):
        run_objective(model, build_objective(cfg, model), batch)


# ----------------------------------------------------------------------------- data modules
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing") / "docs.txt"
    path.write_text("\n".join(f"document number {i} " + "word " * (i % 7) for i in range(60)) + "\n")
    return path


def _text_module(corpus, packing, tmp_path):
    from llmzoo.api import build_tokenizer

    cfg = tiny_cfg()
    dm = instantiate(cfg.data, tokenizer=build_tokenizer(cfg), path=str(corpus), seq_len=32, batch_size=4,
                     val_fraction=0.0, packing=packing, cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path),
                     _convert_="all")
    dm.setup()
    return dm, next(iter(dm.train_dataloader()))


def test_text_data_module_document_packing_marks_documents(corpus, tmp_path):
    dm, batch = _text_module(corpus, "document", tmp_path)
    _, concat = _text_module(corpus, "concat", tmp_path)
    assert torch.equal(batch["input_ids"], concat["input_ids"])  # the same rows, now with boundaries
    doc, labels, eos = batch["doc_ids"], batch["labels"], dm.tokenizer.eos_id
    starts = torch.nn.functional.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)
    assert bool((labels[starts] == IGNORE_INDEX).all()) and bool((labels[~starts] == batch["input_ids"][~starts]).all())
    ends = (batch["input_ids"] == eos)[:, :-1]  # a document ends with eos; the next token starts another
    assert bool(starts[:, 1:][ends].all())


def test_text_data_module_packing_none_pads_one_document_per_row(corpus, tmp_path):
    dm, batch = _text_module(corpus, "none", tmp_path)
    ids, labels = batch["input_ids"], batch["labels"]
    assert "doc_ids" not in batch
    eos = dm.tokenizer.eos_id
    for row, lab in zip(ids, labels):
        n = int((lab != IGNORE_INDEX).sum())  # the document, then padding (never a target)
        assert bool((lab[n:] == IGNORE_INDEX).all()) and (row[:n] == eos).sum() <= 1
        assert row[n - 1] == eos or n == 32  # whole, or cut at seq_len


def test_instruction_samples_pack_first_fit_decreasing():
    from llmzoo_plugins.chat_data import pack_first_fit

    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(2, 40, (50,), generator=g)]
    rows = [{"input_ids": list(range(n)), "labels": [IGNORE_INDEX] + list(range(1, n))} for n in lengths]
    packed = pack_first_fit(rows, 64, documents=True)
    assert all(len(r["input_ids"]) <= 64 for r in packed)
    assert sorted(lengths) == sorted(int((torch.tensor(r["doc_ids"]) == d).sum())
                                     for r in packed for d in set(r["doc_ids"]))
    assert len(packed) <= -(-sum(lengths) // 64) + 2  # first-fit-decreasing: close to the bound
    assert sum(len(r["labels"]) for r in packed) == sum(lengths)


# ----------------------------------------------------------------------------- configs
def test_auto_packing_resolves_by_what_the_stack_can_do():
    from llmzoo.config import packing_of

    assert packing_of(tiny_cfg()) == "document"
    assert packing_of(tiny_cfg("block=mamba2", "objective=sft", "data=instructions")) == "document"
    assert packing_of(tiny_cfg("parallel=pipeline", "model.n_layers=2")) == "auto"  # its own way: unpacked


def test_document_packing_is_refused_where_it_cannot_hold():
    from llmzoo.config import ConfigError

    with pytest.raises(ConfigError, match="data.packing=document keeps packed documents apart.*owns the step"):
        tiny_cfg("parallel=pipeline", "model.n_layers=2", "data.packing=document")
    with pytest.raises(ConfigError, match="dpo.DPO builds its own model inputs"):
        tiny_cfg("objective=dpo", "data=preferences", "data.packing=document")
    from llmzoo.config import packing_problems

    cfg = tiny_cfg()
    cfg.block._target_ = "llmzoo.layers.ResidualBlock"  # says nothing of packing
    assert "lacks the 'packed' capability" in " ".join(packing_problems(cfg))
