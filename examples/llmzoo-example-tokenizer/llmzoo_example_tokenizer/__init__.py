"""tokenizer=example_kmer: DNA text (A, C, G, T, N and newlines) in non-overlapping k-mers.

"ACGTACGTA" with k=3 -> ACG TAC GTA. A run of bases is cut into k-mers from its start;
a tail shorter than k becomes one shorter piece (every string of 1..k bases is in the
vocabulary), so ``decode(encode(text)) == text`` for every DNA text. Anything else in
the text is an error naming the character and its position.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

from llmzoo import hookimpl

BASES = "ACGTN"
FILE = "kmer_tokenizer.json"


class KmerTokenizer:
    def __init__(self, k: int = 3):
        if k < 1:
            raise ValueError(f"tokenizer.k must be >= 1, got {k}")
        self.k = k
        pieces = ["\n"] + ["".join(p) for n in range(1, k + 1) for p in itertools.product(BASES, repeat=n)]
        self.ids = {p: i for i, p in enumerate(pieces)}
        self.pieces = pieces
        self.bos_id, self.eos_id, self.pad_id = len(pieces), len(pieces) + 1, len(pieces) + 2
        self.vocab_size = len(pieces) + 3

    @staticmethod
    def check(node, cfg) -> list[str]:
        k = node.get("k")
        return [] if isinstance(k, int) and 1 <= k <= 8 else [f"k={k!r} is not allowed: an integer in 1..8"]

    def encode(self, text: str) -> list[int]:
        out = []
        for line_no, line in enumerate(text.split("\n")):
            if line_no:
                out.append(self.ids["\n"])
            bad = next((i for i, c in enumerate(line) if c not in BASES), None)
            if bad is not None:
                raise ValueError(f"kmer tokenizer: {line[bad]!r} at line {line_no + 1}, column {bad + 1} is not one "
                                 f"of {list(BASES)}")
            out += [self.ids[line[i:i + self.k]] for i in range(0, len(line), self.k)]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids if i < len(self.pieces))

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / FILE).write_text(json.dumps({"k": self.k}))

    @classmethod
    def load(cls, directory: str | Path) -> "KmerTokenizer":
        return cls(**json.loads((Path(directory) / FILE).read_text()))


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
