"""Generate llmzoo's bundled training corpus (core/assets/corpus.txt).

Every line is one record, written by small grammars with learnable structure:
  - stories whose names, animals and objects must stay consistent within the story,
  - arithmetic whose answers are exact ("17 + 25 = 42."),
  - DNA-like genes: a promoter motif, a start codon, codons, a stop codon,
    and a protein-like translation through a fixed codon table.
Nothing is copied from elsewhere. Deterministic for a given seed:
    python scripts/make_corpus.py [--seed 0] [--out core/assets/corpus.txt]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Ada", "Bo", "Cleo", "Dev", "Eli", "Fen", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lia", "Milo", "Nia",
         "Otto", "Pia", "Rex", "Sol", "Tove", "Uma"]
ANIMALS = ["fox", "owl", "cat", "frog", "bear", "mouse", "duck", "wolf", "hare", "crow"]
ADJS = ["little", "brave", "sleepy", "clever", "quiet", "happy", "old", "tiny", "curious", "kind"]
PLACES = ["forest", "village", "garden", "river", "hill", "barn", "meadow", "cave", "lake", "field"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "golden", "purple"]
OBJECTS = ["ball", "key", "hat", "stone", "book", "shell", "cup", "feather", "drum", "kite"]
FEELINGS = ["glad", "surprised", "proud", "thankful", "happy"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm"]
CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]
STOPS = {"TAA", "TAG", "TGA"}
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# A fixed, made-up genetic code: each non-stop codon maps to one letter.
CODE = {c: AMINO[i % len(AMINO)] for i, c in enumerate(c for c in CODONS if c not in STOPS)}
CODE["ATG"] = "M"


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    animal, adj, place = r.choice(ANIMALS), r.choice(ADJS), r.choice(PLACES)
    color, obj, feeling = r.choice(COLORS), r.choice(OBJECTS), r.choice(FEELINGS)
    s = (f"Once upon a time, {a} the {adj} {animal} lived in a {place}. "
         f"One {r.choice(WEATHER)} day, {a} found a {color} {obj} near the {place}. ")
    if r.random() < 0.5:
        s += f"{a} gave the {color} {obj} to {b}, and {b} was {feeling}. "
    else:
        s += f"{a} kept the {color} {obj} and showed it to {b}. {b} said, \"What a {color} {obj}!\" "
    if r.random() < 0.4:
        n = r.randint(2, 5)
        s += f"Then {a} and {b} walked {n} miles home. "
    return s + f"The {animal} slept well that night. The end."


def arithmetic(r: random.Random) -> str:
    op = r.choice("+-*")
    if op == "*":
        x, y = r.randint(2, 12), r.randint(2, 12)
        return f"{x} * {y} = {x * y}."
    x, y = r.randint(0, 99), r.randint(0, 99)
    if op == "-":
        x, y = max(x, y), min(x, y)
        return f"{x} - {y} = {x - y}."
    return f"{x} + {y} = {x + y}."


def gene(r: random.Random) -> str:
    n = r.randint(6, 16)
    body = [r.choice([c for c in CODONS if c not in STOPS]) for _ in range(n)]
    if r.random() < 0.5:  # a conserved motif inside some genes
        body[n // 2: n // 2 + 2] = ["GGC", "GCC"]
    dna = "TATAAT" + "".join(r.choice("ACGT") for _ in range(r.randint(2, 6))) + "ATG" + "".join(body) + r.choice(sorted(STOPS))
    protein = "M" + "".join(CODE[c] for c in body)
    return f"gene: {dna} protein: {protein}"


def generate(seed: int = 0, n_stories: int = 7000, n_math: int = 9000, n_genes: int = 3000) -> str:
    r = random.Random(seed)
    lines = [story(r) for _ in range(n_stories)] + [arithmetic(r) for _ in range(n_math)] + \
            [gene(r) for _ in range(n_genes)]
    r.shuffle(lines)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "core" / "assets" / "corpus.txt"))
    args = p.parse_args()
    text = generate(args.seed)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.splitlines())} records, {len(text) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
