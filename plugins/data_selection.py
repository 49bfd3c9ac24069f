"""Data selection for ``llmzoo-data`` (``select=``): choose a target-sized subset of the
filtered, deduplicated documents by a score, as in the data-selection survey (Albalak et
al. 2024). Selection is global, so it runs after the datatrove stages, over ``data/``:
the chosen documents stay there (in their order), the others go to ``removed/select/``
with their score.

  perplexity  a reference model's perplexity (any llmzoo run): keep the documents it
              finds most likely (``keep: lowest``), or the least (``highest``)
  dsir        importance resampling toward a target corpus (DSIR, Xie et al. 2023):
              hashed word unigram + bigram counts give a target and a raw bag-of-n-grams
              distribution; a document's log importance weight is the sum over its
              n-grams of log p_target - log p_raw; documents are drawn without
              replacement in proportion to the weights (Gumbel top-k, seeded)

A selector is a config node with ``_target_`` and ``scores(texts) -> list[float]``
(higher is kept) and ``target_docs`` or ``fraction`` (how many to keep); llmzoo-data
(``llmzoo_plugins.data_pipeline.run_selection``) does the rest. A third-party package
adds one as ``conf/select/<name>.yaml`` through ``llmzoo_conf_path``.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import torch

from llmzoo.errors import UserError

WORD = re.compile(r"\w+")


# ============================================================================ perplexity
class PerplexitySelector:
    """Score = -perplexity (``keep: lowest``) or +perplexity (``highest``) of each
    document's first ``max_tokens`` tokens under the run in ``run_dir``."""

    def __init__(self, run_dir: str, target_docs: int | None = None, fraction: float | None = None,
                 keep: str = "lowest", max_tokens: int = 512, batch_size: int = 8):
        if keep not in ("lowest", "highest"):
            raise UserError(f"select.keep={keep!r} is not one of ['lowest', 'highest']")
        self.run_dir, self.keep, self.max_tokens, self.batch_size = run_dir, keep, max_tokens, batch_size
        self.target_docs, self.fraction = target_docs, fraction
        self._run = None

    def _load(self):
        if self._run is None:
            from llmzoo.api import load_any

            if not str(self.run_dir).startswith("hf:") and not Path(self.run_dir).exists():
                raise UserError(f"select.run_dir={self.run_dir}: no such run folder")
            self._run = load_any(self.run_dir)
            self._run.model.eval()
        return self._run

    def encode(self, text: str) -> list[int]:
        run = self._load()
        tok = run.tokenizer
        bos = [tok.bos_id] if getattr(tok, "add_bos", False) and getattr(tok, "bos_id", None) is not None else []
        limit = min(self.max_tokens, run.model.max_seq_len)
        return (bos + tok.encode(text))[:limit]

    @torch.no_grad()
    def perplexities(self, texts: Sequence[str]) -> list[float]:
        """exp(mean next-token negative log-likelihood) of each text (NaN for a single
        token); batches are right-padded and the padding is masked, so a text scores the
        same in any batch."""
        from llmzoo.interfaces import IGNORE_INDEX
        from llmzoo.shared.losses import token_logprobs

        model = self._load().model
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.encode(t) for t in texts[i:i + self.batch_size]]
            width = max(2, max(len(x) for x in ids))
            inputs = torch.zeros(len(ids), width, dtype=torch.long)
            labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
            for r, x in enumerate(ids):
                inputs[r, :len(x)] = torch.tensor(x, dtype=torch.long)
                labels[r, :len(x)] = inputs[r, :len(x)]
            logp, mask = token_logprobs(model(inputs).logits, labels)
            n = mask.sum(1)
            ppl = torch.exp(-logp.sum(1) / n.clamp(min=1))
            out += torch.where(n > 0, ppl, torch.nan).tolist()  # one token: no next token to score
        return out

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Higher is kept; a document too short to score (NaN perplexity) comes last."""
        ppl = self.perplexities(texts)
        return [-math.inf if math.isnan(p) else (-p if self.keep == "lowest" else p) for p in ppl]


# ============================================================================ DSIR
def ngram_buckets(text: str, buckets: int) -> list[int]:
    """Hashed lower-case word unigrams and bigrams of ``text`` (crc32, stable across runs)."""
    words = WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [zlib.crc32(g.encode()) % buckets for g in grams]


class ImportanceResampler:
    """DSIR: importance weights log p_target(x) - log p_raw(x) under hashed bag-of-n-gram
    models with add-one smoothing, then ``target_docs`` documents drawn without
    replacement with probability proportional to the weights (Gumbel top-k)."""

    def __init__(self, target: list[str] | str, target_docs: int | None = None, fraction: float | None = None,
                 buckets: int = 10000, seed: int = 0, text_field: str = "text"):
        self.target = [target] if isinstance(target, str) else list(target)
        self.target_docs, self.fraction, self.buckets, self.seed = target_docs, fraction, buckets, seed
        self.text_field = text_field

    def target_texts(self) -> Iterable[str]:
        for p in map(Path, self.target):
            if not p.exists():
                raise UserError(f"select.target: {p}: no such file")
            if p.suffix in (".jsonl", ".json"):
                for line in p.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        yield str(json.loads(line).get(self.text_field, ""))
            else:
                yield p.read_text(encoding="utf-8")

    def log_probs(self, texts: Iterable[str]) -> list[float]:
        counts = [1.0] * self.buckets  # add-one smoothing
        for t in texts:
            for b in ngram_buckets(t, self.buckets):
                counts[b] += 1
        total = sum(counts)
        return [math.log(c / total) for c in counts]

    def log_weights(self, texts: Sequence[str]) -> list[float]:
        target, raw = self.log_probs(self.target_texts()), self.log_probs(texts)
        return [sum(target[b] - raw[b] for b in ngram_buckets(t, self.buckets)) for t in texts]

    def scores(self, texts: Sequence[str]) -> list[float]:
        rng = random.Random(self.seed)
        # Gumbel top-k: the k largest of log w + Gumbel noise are a sample of k without
        # replacement, each draw proportional to w among those left
        return [w - math.log(-math.log(rng.random() or 1e-300)) for w in self.log_weights(texts)]
