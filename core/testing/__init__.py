"""Conformance checks for the five interfaces, the same ones llmzoo runs on its own plugins.

A third-party author runs them in their own tests::

    from llmzoo.testing import check_block, check_decoder, check_objective, check_strategy, check_tokenizer
    check_block(lambda: MyBlock(dim=32, layer_idx=0), dim=32)
    check_tokenizer(MyTokenizer(), texts=["ACGTACGT"])
    check_decoder(MyDecoder(), model, equals_greedy=True)
    check_objective(MyObjective(), model, batch)
    check_strategy(["parallel=my_strategy", "trainer.devices=2"], tmp_path)
    check_kernels(MyKernels(), model.cuda(), ids.cuda(), atol=2e-2)

Each check raises AssertionError with a message saying what differs and by how much.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from ..model import LanguageModel
from ..shared.decoding import ancestor_mask
from ..interfaces import capabilities_of

BlockFactory = Callable[[], nn.Module]


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def check_causality(block: Any, dim: int, seq_len: int = 16, batch: int = 2) -> None:
    """Changing the input at position t changes no output before t."""
    block.eval()
    x = _randn(batch, seq_len, dim)
    y = block(x)
    assert y.shape == x.shape, f"block output shape {tuple(y.shape)} != input shape {tuple(x.shape)}"
    for t in (0, seq_len // 2, seq_len - 1):
        x2 = x.clone()
        x2[:, t] += _randn(batch, dim, seed=t + 1)
        y2 = block(x2)
        if t > 0:
            d = _max_diff(y[:, :t], y2[:, :t])
            # 1e-6, not 0: a block that groups tokens (MoE) may round differently when later
            # tokens change (seen at 7e-9 on some CPUs); a real leak moves outputs by ~1e-2
            assert d <= 1e-6, f"not causal: changing position {t} changed earlier outputs by {d:.3g}"
        assert _max_diff(y[:, t:], y2[:, t:]) > 0, f"changing position {t} changed nothing at or after it"


@torch.no_grad()
def check_stateful_decode(block: Any, dim: int, seq_len: int = 16, batch: int = 2,
                          atol: float = 1e-5, chunks: tuple[int, ...] = (1, 3)) -> None:
    """Feeding the sequence in pieces through ``init_state`` equals one full forward (fp32),
    on the device of the block's parameters."""
    block.eval()
    x = _randn(batch, seq_len, dim, seed=7).to(next(block.parameters()).device)
    full = block(x)
    for chunk in chunks:
        state = block.init_state(batch, seq_len, device=x.device, dtype=x.dtype)
        assert state is not None, "init_state returned None: a block without state cannot decode incrementally"
        parts = [block(x[:, i:i + chunk], state=state) for i in range(0, seq_len, chunk)]
        d = _max_diff(torch.cat(parts, dim=1), full)
        assert d <= atol, f"stateful decode in pieces of {chunk} differs from the full forward by {d:.3g} > {atol}"


@torch.no_grad()
def check_state_reorder(block: Any, dim: int, seq_len: int = 12, atol: float = 1e-5) -> None:
    """``state.reorder(index)`` moves the state to other rows (here: [1, 0, 0], a swap and
    a duplicate): decoding on from there equals the full forward of those rows."""
    block.eval()
    x = _randn(2, seq_len, dim, seed=9)
    index = torch.tensor([1, 0, 0])
    full = block(x[index])
    state = block.init_state(2, seq_len, device=x.device, dtype=x.dtype)
    assert callable(getattr(state, "reorder", None)), "the decode state needs reorder(index) (see DecodeState)"
    half = seq_len // 2
    block(x[:, :half], state=state)
    state.reorder(index)
    rest = torch.cat([block(x[index][:, t:t + 1], state=state) for t in range(half, seq_len)], dim=1)
    d = _max_diff(rest, full[:, half:])
    assert d <= atol, f"decoding after reorder([1, 0, 0]) differs from the full forward of those rows by {d:.3g}"


@torch.no_grad()
def check_row_state(block: Any, dim: int, lengths: tuple[int, ...] = (3, 7, 5), steps: int = 4,
                    atol: float = 1e-5) -> None:
    """For blocks with ``row_state``: rows of ``init_state(..., rows=True)`` are independent
    sequences at their own positions. Each row's prompt is prefilled alone and ``put``
    into the batch; decoding all rows together, or only the first rows through
    ``head(b)``, reusing a row for a new sequence, and (where the state has ``rewind``)
    rewinding each row by its own count, gives every row its own full forward's outputs."""
    block.eval()
    b_rows, total = len(lengths), max(lengths) + steps + 4
    xs = [_randn(1, n + steps + 1, dim, seed=20 + i) for i, n in enumerate(lengths)]
    refs = [block(x)[0] for x in xs]
    state = block.init_state(b_rows, total, device=None, dtype=None, rows=True)
    assert callable(getattr(state, "put", None)) and callable(getattr(state, "head", None)), \
        "a row_state block's init_state(..., rows=True) needs put(row, other) and head(b) (see DecodeState)"

    def prefill(row: int, x: torch.Tensor, n: int) -> None:
        single = block.init_state(1, total, device=None, dtype=None)
        block(x[:, :n], state=single)
        state.put(row, single)

    for i, (n, x) in enumerate(zip(lengths, xs)):
        prefill(i, x, n)
    at = list(lengths)
    for step in range(steps + 1):
        if step == steps:  # row 0 starts a new sequence; the others go on
            xs[0], at[0] = _randn(1, 4, dim, seed=30), 3
            refs[0] = block(xs[0])[0]
            prefill(0, xs[0], 3)
        rows = b_rows if step % 2 == 0 else b_rows - 1  # odd steps: only the first rows, through head()
        tokens = torch.cat([xs[i][:, at[i]:at[i] + 1] for i in range(rows)])
        out = block(tokens, state=state if rows == b_rows else state.head(rows))
        for i in range(rows):
            d = _max_diff(out[i, 0], refs[i][at[i]])
            assert d <= atol, (f"row {i} of a rows=True state at position {at[i]} differs from its own full forward "
                               f"by {d:.3g} > {atol} (step {step}, {rows} rows decoding)")
            at[i] += 1
    if callable(getattr(state, "rewind", None)):  # per-row counts: rows forget different amounts
        drop = [1 + i % 2 for i in range(b_rows)]
        state.rewind(drop)
        at = [a - n for a, n in zip(at, drop)]
        out = block(torch.cat([xs[i][:, at[i]:at[i] + 1] for i in range(b_rows)]), state=state)
        for i in range(b_rows):
            d = _max_diff(out[i, 0], refs[i][at[i]])
            assert d <= atol, (f"after rewind({drop}) row {i} at position {at[i]} differs from its own full forward "
                               f"by {d:.3g} > {atol}: a rows=True state's rewind takes one count per row")


# parent of each candidate of the tree check (node 0 is the root): two branches, depth 3
_TREE_PARENTS = (-1, 0, 0, 1, 1, 3, 2)


def _path(parents: tuple[int, ...], i: int) -> list[int]:
    """Node i and its ancestors, root first."""
    out = [i]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


@torch.no_grad()
def check_tree_state(block: Any, dim: int, lengths: tuple[int, ...] = (5,), rows: bool = False,
                     atol: float = 1e-5, static: bool = False) -> None:
    """For blocks with ``tree_mask``: after a prefix, one forward over a candidate tree
    (``state.tree`` set) gives at every node the output of a full forward over the prefix
    and that node's path; ``keep(start, index)`` then leaves exactly the kept path, so the
    next token's output equals a full forward's. With ``rows`` (and ``row_state``) the rows
    hold prefixes of different ``lengths``, share one tree, and keep different paths. With
    ``static`` (and ``static_state``) the same on a static state (compiled Medusa)."""
    block.eval()
    mask, n = ancestor_mask(_TREE_PARENTS), len(_TREE_PARENTS)
    xs = [_randn(1, m, dim, seed=40 + i) for i, m in enumerate(lengths)]
    cand = _randn(len(lengths), n, dim, seed=50)
    nxt = _randn(len(lengths), 1, dim, seed=51)
    total = max(lengths) + n + 2
    if rows:
        state = block.init_state(len(lengths), total, device=None, dtype=None, rows=True)
        for i, x in enumerate(xs):
            single = block.init_state(1, total, device=None, dtype=None)
            block(x, state=single)
            state.put(i, single)
    else:
        assert len(lengths) == 1, "without rows the tree check runs on one sequence"
        state = block.init_state(1, total, device=None, dtype=None, **({"static": True} if static else {}))
        block(xs[0], state=state)
    state.tree = mask
    out = block(cand, state=state)
    kept = [torch.tensor(_path(_TREE_PARENTS, leaf)) for leaf in (5, 6, 4)[: len(lengths)]]
    for b, x in enumerate(xs):
        for i in range(n):
            want = block(torch.cat([x, cand[b:b + 1, _path(_TREE_PARENTS, i)]], 1))[0, -1]
            d = _max_diff(out[b, i], want)
            assert d <= atol, (f"tree forward: row {b}, candidate {i} differs from a full forward over the prefix and "
                               f"its path by {d:.3g} > {atol} (state.tree must restrict each candidate to its ancestors)")
    if rows:
        state.keep(list(lengths), kept)
    else:
        state.keep(lengths[0], kept[0])
    assert getattr(state, "tree", None) is None, "keep(...) must clear state.tree"
    after = block(nxt, state=state)
    for b, x in enumerate(xs):
        want = block(torch.cat([x, cand[b:b + 1, kept[b]], nxt[b:b + 1]], 1))[0, -1]
        d = _max_diff(after[b, 0], want)
        assert d <= atol, (f"after keep: row {b}'s next output differs from a full forward over the prefix and the "
                           f"kept path by {d:.3g} > {atol}")


@torch.no_grad()
def check_static_decode(block: Any, dim: int, seq_len: int = 16, batch: int = 2, atol: float = 1e-5) -> None:
    """For blocks with ``static_state``: a state from ``init_state(..., static=True)`` keeps
    its tensors (same objects, shapes and storage) while decoding, gives the full
    forward's outputs, and after ``reset()`` decodes the same again."""
    block.eval()
    x = _randn(batch, seq_len, dim, seed=8)
    full = block(x)
    state = block.init_state(batch, seq_len + 4, device=x.device, dtype=x.dtype, static=True)
    assert hasattr(state, "reset"), "a static state needs reset()"
    tensors = {n: (t, t.shape, t.data_ptr()) for n, t in vars(state).items() if isinstance(t, torch.Tensor)}
    for attempt in range(2):
        prefill = seq_len // 2
        parts = [block(x[:, :prefill], state=state)] + [block(x[:, i:i + 1], state=state) for i in range(prefill, seq_len)]
        d = _max_diff(torch.cat(parts, dim=1), full)
        assert d <= atol, f"static-state decode (attempt {attempt}) differs from the full forward by {d:.3g} > {atol}"
        for n, (t, shape, ptr) in tensors.items():
            now = getattr(state, n)
            assert now is t and now.shape == shape and now.data_ptr() == ptr, \
                f"static state field {n!r} was replaced or resized: update it in place"
        state.reset()
    if hasattr(state, "rewind"):  # a static KV cache forgets tokens in place (compiled speculative decoding)
        other = _randn(batch, 3, dim, seed=9)
        block(x[:, :seq_len - 3], state=state)
        block(other, state=state)
        state.rewind(3)
        d = _max_diff(block(x[:, seq_len - 3:], state=state), full[:, seq_len - 3:])
        assert d <= atol, f"static state: after rewind(3) the outputs differ from the full forward by {d:.3g} > {atol}"
        state.reset()


@torch.no_grad()
def check_state_dict_roundtrip(make_block: BlockFactory, dim: int, seq_len: int = 8) -> None:
    """A fresh block given another's state_dict computes the same outputs."""
    torch.manual_seed(1)
    a = make_block().eval()
    torch.manual_seed(2)
    b = make_block().eval()
    x = _randn(2, seq_len, dim, seed=3)
    missing = b.load_state_dict(a.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, str(missing)
    d = _max_diff(a(x), b(x))
    assert d == 0.0, f"state_dict round trip changed outputs by {d:.3g}"


@torch.no_grad()
def check_dtype_move(block: Any, dim: int, seq_len: int = 8, atol: float = 1e-4) -> None:
    """``block.to(float64)`` (and to CUDA when present) runs and agrees with float32,
    statefully too."""
    block.eval()
    x = _randn(2, seq_len, dim, seed=4)
    ref = block(x)
    targets: list[tuple[Any, torch.dtype, float]] = [("cpu", torch.float64, atol)]
    if torch.cuda.is_available():
        targets.append(("cuda", torch.float32, 1e-3))
    for device, dtype, tol in targets:
        moved = copy.deepcopy(block).to(device=device, dtype=dtype)
        xm = x.to(device=device, dtype=dtype)
        y = moved(xm)
        assert y.dtype == dtype and y.device.type == device, f"output is {y.dtype} on {y.device}, expected {dtype} on {device}"
        d = _max_diff(y.cpu(), ref)
        assert d <= tol, f"block on {device}/{dtype} differs from float32 CPU by {d:.3g} > {tol}"
        state = moved.init_state(2, seq_len, device=torch.device(device), dtype=dtype)
        if state is not None:
            steps = torch.cat([moved(xm[:, i:i + 1], state=state) for i in range(seq_len)], dim=1)
            d = _max_diff(steps.cpu(), ref)
            assert d <= tol, f"stateful decode on {device}/{dtype} differs by {d:.3g} > {tol}"


def check_gradients(block: Any, dim: int, seq_len: int = 8) -> None:
    """Every parameter receives a finite gradient from a full forward."""
    block.train()
    x = _randn(2, seq_len, dim, seed=5).requires_grad_(True)
    block(x).square().mean().backward()
    for name, p in block.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"parameter {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"parameter {name} has a non-finite gradient"
    block.zero_grad(set_to_none=True)


def check_packed(block: Any, dim: int, lengths: tuple[int, ...] = (5, 1, 9, 3), pad: int = 2,
                 atol: float = 1e-5) -> None:
    """A block with the ``packed`` capability, given documents of ``lengths`` packed into one
    row (then ``pad`` padding tokens, document -1) with ``Segments``: each document's output,
    and the gradient of a loss on it with respect to the input and every parameter, equal
    that document run alone (float32, within ``atol`` relative to the largest magnitude)."""
    from ..interfaces import Segments

    T = sum(lengths) + pad
    x = _randn(1, T, dim, seed=11).requires_grad_(True)
    w = _randn(1, T, dim, seed=12)  # a fixed linear loss: its gradient is w
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    params = [p for p in block.parameters() if p.requires_grad]
    block.zero_grad(set_to_none=True)
    packed = block(x, segments=Segments.of(doc))
    (packed[:, : sum(lengths)] * w[:, : sum(lengths)]).sum().backward()
    packed_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    alone_grads = [torch.zeros_like(p) for p in params]
    start, x_grad = 0, torch.zeros_like(x)
    for n in lengths:
        block.zero_grad(set_to_none=True)
        xd = x.detach()[:, start:start + n].clone().requires_grad_(True)
        out = block(xd)
        scale = out.abs().max().item() or 1.0
        d = _max_diff(out, packed[:, start:start + n]) / scale
        assert d <= atol, f"packed document at {start}..{start + n} differs from the document alone by {d:.3g} (relative)"
        (out * w[:, start:start + n]).sum().backward()
        assert xd.grad is not None, "the block's output does not depend on its input"
        x_grad[:, start:start + n] = xd.grad
        alone_grads = [a + (torch.zeros_like(p) if p.grad is None else p.grad) for a, p in zip(alone_grads, params)]
        start += n
    scale = x_grad.abs().max().item() or 1.0
    assert x.grad is not None, "the block's packed output does not depend on its input"
    d = _max_diff(x.grad[:, : sum(lengths)], x_grad[:, : sum(lengths)]) / scale
    assert d <= atol, f"input gradient of packed documents differs from the documents alone by {d:.3g} (relative)"
    for (name, _), a, b in zip(((n, p) for n, p in block.named_parameters() if p.requires_grad), packed_grads,
                               alone_grads):
        d = _max_diff(a, b) / (b.abs().max().item() or 1.0)
        assert d <= atol, f"gradient of {name} with packed documents differs from the documents alone by {d:.3g}"
    block.zero_grad(set_to_none=True)


def check_block(make_block: BlockFactory, dim: int, *, seq_len: int = 16, atol: float = 1e-5) -> None:
    """Run every conformance check on blocks built by ``make_block`` (a no-argument factory)."""
    torch.manual_seed(0)
    block: Any = make_block()
    assert isinstance(getattr(block, "capabilities", None), frozenset), "block.capabilities must be a frozenset"
    check_causality(block, dim, seq_len)
    if block.init_state(1, 1, device=None, dtype=None) is not None:
        check_stateful_decode(block, dim, seq_len, atol=atol)
        check_state_reorder(block, dim, atol=atol)
    if "static_state" in block.capabilities:
        check_static_decode(block, dim, seq_len, atol=atol)
    if "row_state" in block.capabilities:
        check_row_state(block, dim, atol=atol)
    if "tree_mask" in block.capabilities:
        check_tree_state(block, dim, atol=atol)
        if "row_state" in block.capabilities:
            check_tree_state(block, dim, lengths=(5, 2, 8), rows=True, atol=atol)
        if "static_state" in block.capabilities:
            check_tree_state(block, dim, atol=atol, static=True)
    if "packed" in capabilities_of(block):
        check_packed(block, dim, atol=atol)
    check_state_dict_roundtrip(make_block, dim)
    check_dtype_move(block, dim)
    check_gradients(block, dim)


@torch.no_grad()
def check_model_decode(model: LanguageModel, ids: torch.Tensor, prefill: int, atol: float = 1e-5) -> None:
    """A whole LanguageModel: prefill ``prefill`` tokens, then one token at a time through
    ``init_states``; the logits must equal one full forward. ids: (B, T) token ids."""
    model.eval()
    B, T = ids.shape
    full = model(ids).logits
    states = model.init_states(B, T)
    steps = [model(ids[:, :prefill], states=states).logits]
    steps += [model(ids[:, t:t + 1], states=states).logits for t in range(prefill, T)]
    d = _max_diff(torch.cat(steps, 1), full)
    assert d <= atol, f"model decode (prefill {prefill}, then single tokens) differs from the full forward by {d:.3g}"


def check_kernels(kernels: Any, model: LanguageModel, ids: torch.Tensor, *, atol: float = 1e-5) -> None:
    """A ``kernels=`` option (``llmzoo.interfaces.Kernels``) on a LanguageModel, on the
    device of ``model`` and ``ids``: the state-dict names and values stay as they were, the
    logits of a forward and the gradients of every parameter equal the reference model's
    within ``atol`` (relative to each tensor's largest magnitude), and the model reloads
    the reference's weights."""
    ref = model
    fast = kernels.apply(copy.deepcopy(model))
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(fast_sd) == list(ref_sd), (
        f"kernels {getattr(kernels, 'name', kernels)!r} changed the state-dict names: "
        f"{sorted(set(fast_sd) ^ set(ref_sd))[:5]}")
    for k, v in ref_sd.items():
        assert torch.equal(fast_sd[k], v), f"kernels changed the value of {k}"
    fast.load_state_dict(ref_sd)
    outs = []
    for m in (ref, fast):
        m.zero_grad(set_to_none=True)
        logits = m(ids).logits
        (logits.float().square().mean()).backward()
        outs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (ref_logits, ref_grads), (fast_logits, fast_grads) = outs
    scale = ref_logits.abs().max().item() or 1.0
    d = _max_diff(fast_logits, ref_logits) / scale
    assert d <= atol, f"logits with the kernels differ from the reference by {d:.3g} (relative)"
    assert fast_grads.keys() == ref_grads.keys(), "the kernels changed which parameters get gradients"
    for n, g in ref_grads.items():
        d = _max_diff(fast_grads[n], g) / (g.abs().max().item() or 1.0)
        assert d <= atol, f"gradient of {n} with the kernels differs from the reference by {d:.3g} (relative)"
    ref.zero_grad(set_to_none=True)


# ============================================================================ tokenizers
def check_tokenizer(tokenizer: Any, texts: list[str] | None = None) -> None:
    """Special ids in range, ``decode(encode(t)) == t`` for ``texts``, ``save``/``load``
    round trip, and ``encode_batch`` / ``render_chat`` (when present) agreeing with ``encode``."""
    import tempfile

    texts = texts if texts is not None else ["Hello, world!", "  two  spaces\nand a newline", "12 + 7 = 19", ""]
    V = tokenizer.vocab_size
    assert isinstance(V, int) and V > 0, f"vocab_size must be a positive int, got {V!r}"
    for name in ("bos_id", "eos_id", "pad_id"):
        v = getattr(tokenizer, name)
        assert isinstance(v, int) and 0 <= v < V, f"{name}={v!r} is not in range(vocab_size={V})"
    for t in texts:
        ids = tokenizer.encode(t)
        assert all(isinstance(i, int) and 0 <= i < V for i in ids), f"encode({t!r}) gave ids outside range({V})"
        assert tokenizer.decode(ids) == t, f"decode(encode({t!r})) = {tokenizer.decode(ids)!r}"
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        again = type(tokenizer).load(d)
    assert again.vocab_size == V and [again.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts], \
        "a tokenizer loaded from save() encodes differently"
    if callable(getattr(tokenizer, "encode_batch", None)):
        assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts], "encode_batch != encode per text"
    if callable(getattr(tokenizer, "render_chat", None)):
        pieces = tokenizer.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        assert all(isinstance(text, str) and isinstance(trained, bool) for text, trained in pieces), \
            "render_chat must return (text, trained) pairs"
        assert "".join(t for t, trained in pieces if trained).startswith("yo"), "only the assistant's words are trained"


# ============================================================================ decoders
@torch.no_grad()
def slow_greedy(model: LanguageModel, prompt: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """The reference: one full forward over the whole sequence per new token, no state."""
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
        if token == eos_id:
            break
    return out


@torch.no_grad()
def check_decoder(decoder: Any, model: LanguageModel, *, equals_greedy: bool = False, max_new_tokens: int = 8,
                  prompts: list[list[int]] | None = None) -> None:
    """Ragged prompts in one batch; outputs of at most ``max_new_tokens`` ids in the
    vocabulary that stop at eos; the same outputs on a second call (determinism) and
    prompt by prompt (batching changes nothing) for deterministic decoders; with
    ``equals_greedy``, exactly the tokens of ``slow_greedy`` (a full forward per token)."""
    model = model.eval()
    V = model.vocab_size
    prompts = prompts or [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    greedy = [slow_greedy(model, p, max_new_tokens, None) for p in prompts]
    eos = greedy[0][2]  # a token the first prompt reaches: its output must stop there
    outs = decoder.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos)
    assert isinstance(outs, list) and len(outs) == len(prompts), f"{len(outs)} outputs for {len(prompts)} prompts"
    for p, o in zip(prompts, outs):
        assert 0 < len(o) <= max_new_tokens, f"prompt {p}: {len(o)} new tokens, expected 1..{max_new_tokens}"
        assert all(isinstance(t, int) and 0 <= t < V for t in o), f"prompt {p}: ids outside range({V}): {o}"
        assert eos not in o[:-1], f"prompt {p}: output continues after eos={eos}: {o}"
    sampler = getattr(decoder, "sampler", None)
    deterministic = sampler is None or getattr(sampler, "greedy", False) or getattr(sampler, "seed", None) is not None
    if deterministic:
        again = decoder.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos)
        assert again == outs, f"a second call with the same inputs differs: {outs} then {again}"
    if equals_greedy:
        want = [slow_greedy(model, p, max_new_tokens, eos) for p in prompts]
        assert outs == want, f"outputs differ from greedy decoding with full forwards:\n  got  {outs}\n  want {want}"
        alone = [decoder.generate(model, [p], max_new_tokens=max_new_tokens, eos_id=eos)[0] for p in prompts]
        assert alone == outs, f"decoding each prompt alone differs from decoding them together: {alone} vs {outs}"


# ============================================================================ objectives
def check_objective(objective: Any, model: nn.Module, batch: dict[str, Any], *, atol: float = 1e-5) -> None:
    """On a real batch of the data the objective declares: ``needs`` present; a finite
    scalar loss with finite gradients for the model and the objective's own parameters;
    scalar finite metrics; and -- unless it samples (``prepare``) -- the loss of the
    whole batch equals its two halves weighted by ``weight`` (what micro-batching strategies rely on)."""
    from ..interfaces import as_metric
    from ..losses import batch_rows, batch_size, batch_weight, model_inputs, run_objective

    needs = getattr(objective, "needs", None)
    assert isinstance(needs, frozenset), "objective.needs must be a frozenset of batch field names"
    assert needs <= set(batch), f"the batch lacks fields the objective needs: {sorted(needs - set(batch))}"
    torch.manual_seed(0)
    model.train()
    loss = run_objective(model, objective, batch)
    assert loss.value.dim() == 0 and torch.isfinite(loss.value), f"loss must be a finite scalar, got {loss.value}"
    for name, m in loss.metrics.items():
        v = torch.as_tensor(as_metric(m).value)
        assert v.numel() == 1 and torch.isfinite(v).all(), f"metric {name} must be a finite scalar, got {v}"
        assert as_metric(m).reduce in ("mean", "sum"), f"metric {name}: reduce must be 'mean' or 'sum'"
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(objective, nn.Module):
        params += [(f"objective.{n}", p) for n, p in objective.named_parameters() if p.requires_grad]
    loss.value.backward()
    got = [(n, p.grad) for n, p in params if p.grad is not None]
    assert got, "the loss gave no parameter a gradient"
    for n, g in got:
        assert torch.isfinite(g).all(), f"parameter {n} has a non-finite gradient"
    model.zero_grad(set_to_none=True)
    if isinstance(objective, nn.Module):
        objective.zero_grad(set_to_none=True)
    if hasattr(objective, "prepare"):
        return
    rows = batch_size(batch)
    k, r = divmod(len(model_inputs(objective, batch)), rows)
    assert r == 0, f"inputs(batch) has {k * rows + r} rows, not a multiple of the batch's {rows}"
    if rows < 2:
        return
    with torch.no_grad():
        model.eval()
        whole = run_objective(model, objective, batch).value
        halves = [batch_rows(batch, part) for part in (slice(0, rows // 2), slice(rows // 2, rows))]
        total = batch_weight(objective, batch).float()
        parts = sum(run_objective(model, objective, h).value * batch_weight(objective, h).float() / total for h in halves)
    d = abs(float(whole) - float(parts))
    assert d <= atol, (f"the loss of the whole batch ({float(whole):.6g}) differs from its halves weighted by "
                       f"weight() ({float(parts):.6g}) by {d:.3g}: define weight(batch) as the count the loss averages over")


# ============================================================================ parallel strategies
def check_strategy(overrides: list[str], run_root: Any, *, steps: int = 2, batch_size: int = 8,
                   atol: float = 1e-5, common: list[str] | None = None,
                   env: dict[str, str] | None = None) -> list[tuple[float, float]]:
    """Train the tiny model for ``steps`` steps with ``overrides`` (e.g. ``["parallel=fsdp",
    "trainer.devices=2"]``), ``batch_size`` rows per process, and on one process with the
    same global batch (``batch_size`` times the strategy run's data-parallel replicas, read
    from its run summary) and seed; every step's loss must agree within ``atol``. Both run
    the ``llmzoo-train`` command as a user would (so Lightning's launcher can start the
    other processes), under ``run_root/strategy`` and ``run_root/one`` (``env``: extra
    environment variables). Returns [(one process, strategy)] per step."""
    import csv
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).with_name("llmzoo-train")
    train = str(command) if command.exists() else shutil.which("llmzoo-train")
    assert train, "check_strategy runs the llmzoo-train command: install llmzoo into this environment"

    common = list(common or []) + [
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=[]",
        "sample.prompts=[]", f"trainer.max_steps={steps}", "trainer.val_every=0", "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu", "optim.warmup_steps=1", "seed=3", "overwrite=true"]
    losses = {}
    replicas = 1
    for name, extra in (("strategy", list(overrides)), ("one", ["parallel=single", "trainer.devices=1"])):
        run_dir = Path(run_root) / name
        rows = batch_size * (replicas if name == "one" else 1)
        cmd = [train, *common, f"data.batch_size={rows}", *extra, f"run_dir={run_dir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        assert proc.returncode == 0, f"{' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        with open(run_dir / "metrics.csv") as fh:
            losses[name] = [float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]
        if name == "strategy":  # the one-process run gets the strategy's global batch
            replicas = json.loads((run_dir / "run_summary.json").read_text()).get("data_parallel", 1)
    one, other = losses["one"], losses["strategy"]
    assert len(one) == len(other) == steps, f"logged {len(one)} and {len(other)} steps, expected {steps}"
    for step, (a, b) in enumerate(zip(one, other)):
        assert abs(a - b) <= atol, f"step {step}: loss {b:.7g} with {overrides} vs {a:.7g} on one process"
    return list(zip(one, other))
