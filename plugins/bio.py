"""Biological sequences: FASTA and FASTQ files as training data (``data.format=fasta|fastq``,
or found by their extensions) and character tokenizers for them (``tokenizer=nucleotide``,
``tokenizer=protein``).

Each record becomes one document: its sequence lines joined (so a gene wrapped at 60 or 80
columns reads as one string), its header kept beside it as ``id`` (not trained on). Case is
kept -- soft-masked (lower-case) bases are a separate token. A record that breaks the
format stops the run with ``file:line`` and what is wrong (``data.skip_bad_records=true``
drops it instead, and counts it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import llmzoo
from llmzoo.data import ChatTemplate
from llmzoo.errors import DataError

# IUPAC nucleotide codes (N any base, R = A/G, ...), the gap, and the same soft-masked
NUCLEOTIDES = "ACGTUNRYSWKMBDHV-"
# the 20 amino acids, B/Z/X ambiguity codes, U selenocysteine, O pyrrolysine, * stop, - gap
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWYBZXUO*-"
SEQUENCE = re.compile(r"[A-Za-z*\-.]+")


def read_fasta(path: str, skip_bad: bool = False, bad: list[str] | None = None,
               reverse_complement: bool = False) -> Iterator[dict]:
    """{"text": sequence, "id": header} per record of a FASTA file (sequence lines joined);
    with ``reverse_complement`` (DNA) each record's other strand follows it as a document."""
    for record in _fasta(path, skip_bad, bad):
        yield record
        if reverse_complement:
            yield {"text": reverse_complement_of(record["text"]), "id": record["id"] + " (reverse complement)"}


def _fasta(path: str, skip_bad: bool, bad: list[str] | None) -> Iterator[dict]:
    header, start, seq = None, 0, []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.startswith(";"):  # blank lines and old-style comments
                continue
            if line.startswith(">"):
                if header is not None:
                    yield from _record(path, start, header, "".join(seq), skip_bad, bad)
                header, start, seq = line[1:].strip(), n, []
            elif header is None:
                _bad(f"{path}:{n}: sequence before the first '>' header", skip_bad, bad)
            elif not SEQUENCE.fullmatch(line):
                wrong = sorted(set(re.sub(SEQUENCE, "", line)))
                _bad(f"{path}:{n}: characters {''.join(wrong)!r} are not sequence letters", skip_bad, bad)
                header = None  # drop the rest of this record
            else:
                seq.append(line)
    if header is not None:
        yield from _record(path, start, header, "".join(seq), skip_bad, bad)


def read_fastq(path: str, skip_bad: bool = False, bad: list[str] | None = None,
               reverse_complement: bool = False) -> Iterator[dict]:
    """{"text": sequence, "id": header} per four-line FASTQ record (qualities checked, not
    kept); ``reverse_complement`` as for FASTA."""
    for record in _fastq(path, skip_bad, bad):
        yield record
        if reverse_complement:
            yield {"text": reverse_complement_of(record["text"]), "id": record["id"] + " (reverse complement)"}


def _fastq(path: str, skip_bad: bool, bad: list[str] | None) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        lines = [line.rstrip("\r\n") for line in fh]
    n = 0
    while n < len(lines):
        if not lines[n].strip():
            n += 1
            continue
        head, seq, plus, qual = (lines[n:n + 4] + ["", "", ""])[:4]
        where = f"{path}:{n + 1}"
        problem = None
        if not head.startswith("@"):
            problem = f"{where}: a FASTQ record starts with '@', got {head[:40]!r}"
        elif not plus.startswith("+"):
            problem = f"{path}:{n + 3}: expected the '+' line of the record at line {n + 1}"
        elif not SEQUENCE.fullmatch(seq):
            problem = f"{path}:{n + 2}: the sequence is empty or holds characters that are not sequence letters"
        elif len(qual) != len(seq):
            problem = f"{path}:{n + 4}: {len(qual)} quality characters for {len(seq)} bases"
        if problem:
            _bad(problem, skip_bad, bad)
        else:
            yield {"text": seq, "id": head[1:].strip()}
        n += 4


def _record(path: str, line: int, header: str, seq: str, skip_bad: bool, bad: list[str] | None) -> Iterator[dict]:
    if not seq:
        _bad(f"{path}:{line}: record {header[:40]!r} has no sequence", skip_bad, bad)
        return
    yield {"text": seq, "id": header}


def _bad(message: str, skip_bad: bool, bad: list[str] | None) -> None:
    if not skip_bad:
        raise DataError(message + " (set data.skip_bad_records=true to drop such records)")
    if bad is not None:
        bad.append(message)


COMPLEMENT = str.maketrans("ACGTUNRYSWKMBDHVacgtunryswkmbdhv-", "TGCAANYRSWMKVHDBtgcaanyrswmkvhdb-")


def reverse_complement_of(seq: str) -> str:
    """The other strand, read 5' to 3' (IUPAC codes complemented; case kept)."""
    return seq.translate(COMPLEMENT)[::-1]


@llmzoo.hookimpl
def llmzoo_data_formats() -> dict:
    return {"fasta": ((".fasta", ".fa", ".fna", ".faa", ".ffn", ".frn"), read_fasta),
            "fastq": ((".fastq", ".fq"), read_fastq)}


# ----------------------------------------------------------------------------- tokenizers
class AlphabetTokenizer(ChatTemplate):
    """One token per letter of ``alphabet`` (and, with ``lower``, per lower-case letter),
    then <unk> for anything else, <bos>, <eos>, <pad>. ``tokenizer=nucleotide`` and
    ``tokenizer=protein`` are two alphabets."""

    META = "llmzoo_tokenizer.json"

    def __init__(self, alphabet: str = NUCLEOTIDES, lower: bool = True):
        letters = list(dict.fromkeys(alphabet + (alphabet.lower() if lower else "")))
        self.alphabet, self.lower = alphabet, lower
        self.ids = {c: i for i, c in enumerate(letters)}
        self.letters = letters
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = range(len(letters), len(letters) + 4)
        self.vocab_size = len(letters) + 4

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.letters)
        return "".join(self.letters[i] if i < n else "?" for i in map(int, ids) if i < n or i == self.unk_id)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.META).write_text(json.dumps({"kind": "alphabet", "alphabet": self.alphabet,
                                                             "lower": self.lower}))

    @classmethod
    def load(cls, directory: str | Path) -> "AlphabetTokenizer":
        meta = json.loads((Path(directory) / cls.META).read_text())
        return cls(meta["alphabet"], meta["lower"])

    @staticmethod
    def check(node, cfg) -> list[str]:
        alphabet = node.get("alphabet", NUCLEOTIDES)
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            return [f"alphabet={alphabet!r}: a non-empty string of distinct letters"]
        return []


class KmerTokenizer(ChatTemplate):
    """DNA as k-mers (``tokenizer=kmer``, ``k`` from the config), as DNABERT-style models read it.

    ``overlap: false`` (default) cuts a sequence into consecutive k-mers of A/C/G/T; a piece
    that holds any other letter (N, IUPAC codes, lower case, a gap), and the last piece when
    shorter than k, become one token per letter. Every string over the nucleotide alphabet
    round-trips exactly. ``overlap: true`` gives the k-mer starting at every position
    (stride 1): n - k + 1 tokens for n bases; a k-mer with any other letter is <unk>, and
    decoding takes the first k-mer whole and the last letter of each next one, so a pure
    A/C/G/T sequence of length >= k round-trips. Ids: the 4^k k-mers, then the single
    letters of the nucleotide alphabet (and their lower case), then <unk>, <bos>, <eos>, <pad>.
    """

    META = "llmzoo_tokenizer.json"

    def __init__(self, k: int = 3, overlap: bool = False):
        if not isinstance(k, int) or not 1 <= k <= 8:
            raise ValueError(f"tokenizer.k={k!r}: an integer from 1 to 8 (4^k k-mers)")
        self.k, self.overlap = k, overlap
        kmers = [""]
        for _ in range(k):
            kmers = [p + b for p in kmers for b in "ACGT"]
        letters = [c for c in dict.fromkeys(NUCLEOTIDES + NUCLEOTIDES.lower()) if c not in kmers]
        self.pieces = kmers + letters
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        n = len(self.pieces)
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = range(n, n + 4)
        self.vocab_size = n + 4

    def encode(self, text: str) -> list[int]:
        k, ids, unk = self.k, self.ids, self.unk_id
        if self.overlap:
            return [ids.get(text[i:i + k], unk) if len(text[i:i + k]) == k and set(text[i:i + k]) <= set("ACGT")
                    else unk for i in range(len(text) - k + 1)]
        out = []
        for i in range(0, len(text), k):
            piece = text[i:i + k]
            if len(piece) == k and piece in ids:
                out.append(ids[piece])
            else:
                out += [ids.get(c, unk) for c in piece]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.pieces)
        pieces = [self.pieces[i] if i < n else "N" for i in map(int, ids) if i < n or i == self.unk_id]
        if self.overlap and pieces:
            return pieces[0] + "".join(p[-1] for p in pieces[1:])
        return "".join(pieces)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.META).write_text(json.dumps({"kind": "kmer", "k": self.k, "overlap": self.overlap}))

    @classmethod
    def load(cls, directory: str | Path) -> "KmerTokenizer":
        meta = json.loads((Path(directory) / cls.META).read_text())
        return cls(meta["k"], meta["overlap"])

    @staticmethod
    def check(node, cfg) -> list[str]:
        k = node.get("k", 3)
        if not isinstance(k, int) or not 1 <= k <= 8:
            return [f"k={k!r}: an integer from 1 to 8 (4^k k-mers)"]
        return []
