"""Generate the bundled synthetic genome for the biology experiment (core/assets/):

  genome.fasta           training contigs: a GC-poor random background with genes, each
                         gene = a sigma-70-like promoter (-35 box TTGACA, 17 bases, -10 box
                         TATAAT), 7 bases, the start codon ATG, 20-60 sense codons and a stop
                         codon (TAA, TAG or TGA); records wrapped at 60 columns
  genome_shuffled.fasta  the same contigs with each contig's bases shuffled: the same
                         composition with every motif destroyed (the experiment's baseline)
  genome_motifs.jsonl    held-out promoters from other contigs as motif-completion rows:
                         {"prompt": the 30 bases before the -10 box + "TA", "answer": "TAAT"}
  bio_instructions.jsonl instructions about sequences (experiment=bio_sft): "Is there a
                         promoter in this sequence?" over 60 bases, "yes" when a -35 box and
                         a -10 box sit 17 bases apart, "no" for background, half of the "no"
                         holding a lone -35 or -10 box as a decoy
  bio_instructions_shuffled.jsonl  the same with the answers shuffled (the baseline)
  bio_instructions_heldout.jsonl   other sequences, to score the answers (eval_task=[promoter_questions])

Nothing is copied from elsewhere; deterministic for a given seed:
    python scripts/make_genome.py [--seed 0] [--contigs 240] [--out core/assets]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BASES, WEIGHTS = "ACGT", (0.3, 0.2, 0.2, 0.3)  # GC 40 %
SENSE = [a + b + c for a in BASES for b in BASES for c in BASES if a + b + c not in ("TAA", "TAG", "TGA")]


def background(r: random.Random, n: int) -> str:
    return "".join(r.choices(BASES, WEIGHTS, k=n))


def gene(r: random.Random) -> tuple[str, int]:
    """(promoter + coding sequence, the offset of its -10 box)."""
    head = "TTGACA" + background(r, 17)
    body = "TATAAT" + background(r, 7) + "ATG" + "".join(r.choices(SENSE, k=r.randint(20, 60)))
    return head + body + r.choice(["TAA", "TAG", "TGA"]), len(head)


def contig(r: random.Random) -> tuple[str, list[int]]:
    """A contig of 2-3 genes between stretches of background; the offsets of their -10 boxes."""
    seq, boxes = background(r, r.randint(20, 60)), []
    for _ in range(r.randint(2, 3)):
        g, box = gene(r)
        boxes.append(len(seq) + box)
        seq += g + background(r, r.randint(20, 60))
    return seq, boxes


QUESTION = "Is there a promoter in this sequence?"


def promoter_question(r: random.Random, answer: bool, decoys: float = 0.0) -> dict:
    """60 bases with a promoter (answer yes) or without one (no; half of them with a decoy:
    a lone -35 or -10 box)."""
    seq = background(r, 60)
    if answer:
        inserts = ["TTGACA" + background(r, 17) + "TATAAT"]
    elif r.random() < decoys:
        inserts = [r.choice(["TTGACA", "TATAAT"])]
    else:
        inserts = []
    for ins in inserts:
        at = r.randint(0, 60 - len(ins))
        seq = seq[:at] + ins + seq[at + len(ins):]
    return {"instruction": QUESTION, "input": seq, "output": "yes" if answer else "no"}


def fasta(records: list[tuple[str, str]]) -> str:
    return "".join(f">{name}\n" + "".join(seq[i:i + 60] + "\n" for i in range(0, len(seq), 60)) for name, seq in records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contigs", type=int, default=240)
    p.add_argument("--heldout", type=int, default=60, help="contigs whose promoters become the eval rows")
    p.add_argument("--questions", type=int, default=1600, help="instruction records for experiment=bio_sft")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "core" / "assets"))
    args = p.parse_args()
    r = random.Random(args.seed)
    train = [contig(r) for _ in range(args.contigs)]
    shuffled = []
    for seq, _ in train:
        letters = list(seq)
        r.shuffle(letters)
        shuffled.append("".join(letters))
    rows = []
    for seq, boxes in (contig(r) for _ in range(args.heldout)):
        rows += [{"prompt": seq[b - 30:b] + "TA", "answer": "TAAT"} for b in boxes if b >= 30]
    questions = [promoter_question(r, i % 2 == 0) for i in range(args.questions)]
    answers = [q["output"] for q in questions]
    r.shuffle(answers)
    heldout = [promoter_question(r, i % 2 == 0) for i in range(200)]
    out = Path(args.out)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(row) + "\n" for row in rows)

    (out / "bio_instructions.jsonl").write_text(jsonl(questions))
    (out / "bio_instructions_shuffled.jsonl").write_text(jsonl([{**q, "output": a} for q, a in zip(questions, answers)]))
    (out / "bio_instructions_heldout.jsonl").write_text(jsonl(  # eval_task=[promoter_questions] rows
        [{"prompt": q["instruction"] + "\n\n" + q["input"], "answer": q["output"]} for q in heldout]))
    (out / "genome.fasta").write_text(fasta([(f"contig_{i} synthetic genes={len(b)}", s) for i, (s, b) in enumerate(train)]))
    (out / "genome_shuffled.fasta").write_text(fasta([(f"contig_{i} shuffled", s) for i, s in enumerate(shuffled)]))
    (out / "genome_motifs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(train)} contigs ({sum(len(s) for s, _ in train)} bases), {len(rows)} held-out promoters -> {out}")


if __name__ == "__main__":
    main()
