"""FASTA / FASTQ data and the nucleotide and protein tokenizers."""

from __future__ import annotations

import pytest
import torch

import llmzoo
from llmzoo.data import DataError, TextDataModule
from llmzoo.testing import check_tokenizer
from llmzoo_plugins.bio import AMINO_ACIDS, AlphabetTokenizer, read_fasta, read_fastq
from llmzoo_plugins.bio import reverse_complement_of as reverse_complement

FASTA = """>chr1 test genome
ACGTACGTNNNNNNNNac
gtacGGTTAA
;a comment line
>gene2 promoter
TATAAT
TTGACA

>empty_line_above
RYKM
"""


def test_fasta_joins_lines_keeps_case_headers_and_n_runs(tmp_path):
    f = tmp_path / "g.fa"
    f.write_text(FASTA)
    records = list(read_fasta(str(f)))
    assert records == [{"text": "ACGTACGTNNNNNNNNacgtacGGTTAA", "id": "chr1 test genome"},
                       {"text": "TATAATTTGACA", "id": "gene2 promoter"}, {"text": "RYKM", "id": "empty_line_above"}]


@pytest.mark.parametrize("text,line,said", [
    ("ACGT\n>x\nAC\n", 1, "sequence before the first '>' header"),
    (">x\nAC GT\n", 2, "characters ' ' are not sequence letters"),
    (">x\nACGT\n>y\n>z\nAA\n", 3, "record 'y' has no sequence"),
    (">x\nAC7T\n", 2, "characters '7'"),
])
def test_bad_fasta_records_name_file_and_line(tmp_path, text, line, said):
    f = tmp_path / "bad.fasta"
    f.write_text(text)
    with pytest.raises(DataError, match=rf"bad.fasta:{line}: {said}"):
        list(read_fasta(str(f)))
    bad: list[str] = []
    kept = list(read_fasta(str(f), skip_bad=True, bad=bad))
    assert len(bad) == 1 and all(r["text"] for r in kept)


def test_fastq_records_and_errors(tmp_path):
    f = tmp_path / "r.fq"
    f.write_text("@read1\nACGTN\n+\nIIII#\n@read2 x\nacgt\n+read2\nABCD\n")
    assert list(read_fastq(str(f))) == [{"text": "ACGTN", "id": "read1"}, {"text": "acgt", "id": "read2 x"}]
    for text, said in (("@r\nACGT\n+\nIII\n", "r.fq:4: 3 quality characters for 4 bases"),
                       ("r\nACGT\n+\nIIII\n", "r.fq:1: a FASTQ record starts with '@'"),
                       ("@r\nACGT\nIIII\n", "r.fq:3: expected the '\\+' line")):
        f.write_text(text)
        with pytest.raises(DataError, match=said):
            list(read_fastq(str(f)))


def test_reverse_complement():
    assert reverse_complement("ATGCNacgtR") == "YacgtNGCAT"
    assert reverse_complement("AACGTT") == "AACGTT" and reverse_complement("ATGc") == "gCAT"
    assert reverse_complement("RYN") == "NRY" and reverse_complement(reverse_complement("ACGTRYKMN")) == "ACGTRYKMN"


@pytest.mark.parametrize("tok,texts", [
    (AlphabetTokenizer(), ["ACGTNNNNacgt", "TATAAT-RYKM", ""]),
    (AlphabetTokenizer(AMINO_ACIDS, lower=False), ["MKTAYIAKQR*", "ACDEFGHIKLMNPQRSTVWYBZXUO-", ""]),
])
def test_alphabet_tokenizers_pass_the_tokenizer_check(tok, texts, tmp_path):
    check_tokenizer(tok, texts=texts)
    assert tok.encode("A") != tok.encode("a") if tok.lower else True
    assert tok.encode("Ü") == [tok.unk_id] and tok.decode([tok.unk_id]) == "?"


def test_fasta_trains_with_the_nucleotide_tokenizer(tmp_path):
    f = tmp_path / "genes.fasta"
    f.write_text("".join(f">g{i}\nATG{'ACGT' * (i % 5 + 3)}TAA\n" for i in range(80)))
    dm = TextDataModule(AlphabetTokenizer(), path=str(f), seq_len=16, batch_size=4, val_fraction=0)
    dm.setup()
    tok = AlphabetTokenizer()
    flat = [t for i in range(80) for t in tok.encode(f"ATG{'ACGT' * (i % 5 + 3)}TAA") + [tok.eos_id]]
    blocks = torch.cat([dm.train_ds[i]["input_ids"] for i in range(len(dm.train_ds))]).tolist()
    assert blocks == flat[:len(blocks)]  # auto-detected as FASTA: records in file order, joined by eos
    rc = TextDataModule(AlphabetTokenizer(), path=str(f), seq_len=16, batch_size=4, val_fraction=0,
                        format_options={"reverse_complement": True})
    rc.setup()
    assert len(rc.train_ds) == pytest.approx(2 * len(dm.train_ds), abs=1)  # each record and its other strand
    cfg = llmzoo.compose(overrides=["model=tiny", "tokenizer=nucleotide", f"data.path={f}", "data.seq_len=32",
                                    "data.batch_size=4", "data.val_fraction=0", "trainer.max_steps=3",
                                    "trainer.val_every=0", "logger=[]",
                                    "sample.prompts=[]", "trainer.enable_progress_bar=false",
                                    f"run_dir={tmp_path / 'run'}"])
    assert llmzoo.train(cfg)["step"] == 3
    run = llmzoo.load_run(tmp_path / "run")
    assert isinstance(run.tokenizer, AlphabetTokenizer) and run.model.vocab_size == run.tokenizer.vocab_size


# ----------------------------------------------------------------------------- k-mers
def test_kmer_tokenizer_round_trips_every_nucleotide_string():
    from llmzoo_plugins.bio import KmerTokenizer

    tok = KmerTokenizer(k=3)
    check_tokenizer(tok, texts=["ACGTACGTA", "ACGTNNNNacgtRY-", "AC", "", "TATAATTTGACA"])
    assert tok.encode("ACGTTG") == [tok.ids["ACG"], tok.ids["TTG"]]  # one token per k-mer
    assert tok.encode("ACNGT") == [tok.ids["A"], tok.ids["C"], tok.ids["N"], tok.ids["G"], tok.ids["T"]]
    assert tok.vocab_size == 4 ** 3 + len(set("ACGTUNRYSWKMBDHV-" + "acgtunryswkmbdhv-")) + 4
    assert tok.encode("Ü") == [tok.unk_id]
    with pytest.raises(ValueError, match="tokenizer.k=0"):
        KmerTokenizer(k=0)


def test_overlapping_kmers_give_one_token_per_position():
    from llmzoo_plugins.bio import KmerTokenizer

    tok = KmerTokenizer(k=4, overlap=True)
    seq = "ACGTTGCAAT"
    ids = tok.encode(seq)
    assert [tok.pieces[i] for i in ids] == [seq[i:i + 4] for i in range(len(seq) - 3)]
    assert tok.decode(ids) == seq
    assert tok.encode("ACGNTT") == [tok.unk_id] * 3  # every 4-mer here holds the N
    check_tokenizer(tok, texts=["ACGTACGTAC", "TTTTGGGGCCCCAAAA"])


def test_kmer_tokenizer_trains_and_reloads_with_a_run(tmp_path):
    from llmzoo_plugins.bio import KmerTokenizer

    cfg = llmzoo.compose(overrides=["model=tiny", "tokenizer=kmer", "tokenizer.k=2", "data.path=${llmzoo.asset:genome.fasta}",
                                    "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_every=0",
                                    "logger=[]", "sample.prompts=[]", "trainer.enable_progress_bar=false",
                                    f"run_dir={tmp_path / 'run'}"])
    assert llmzoo.train(cfg)["step"] == 2
    run = llmzoo.load_run(tmp_path / "run")
    assert isinstance(run.tokenizer, KmerTokenizer) and run.tokenizer.k == 2
    assert run.model.vocab_size == run.tokenizer.vocab_size


# ----------------------------------------------------------------------------- the genome experiment
def test_bundled_genome_has_the_promoter_structure_the_eval_asks_about():
    import json
    from importlib import resources

    assets = resources.files("llmzoo.assets")
    records = list(read_fasta(str(assets / "genome.fasta")))
    assert len(records) == 240 and all(set(r["text"]) <= set("ACGT") for r in records)
    genes = sum(r["text"].count("TTGACA") for r in records)
    assert genes >= 480  # 2-3 promoters per contig (and a few chance TTGACA in the background)
    rows = [json.loads(line) for line in (assets / "genome_motifs.jsonl").read_text().splitlines()]
    assert len(rows) > 100
    for row in rows:  # -35 box, 17 bases, then the -10 box whose first two letters end the prompt
        assert row["prompt"][7:13] == "TTGACA" and row["prompt"].endswith("TA") and row["answer"] == "TAAT"
    shuffled = list(read_fasta(str(assets / "genome_shuffled.fasta")))
    assert [sorted(r["text"]) for r in shuffled] == [sorted(r["text"]) for r in records]  # same composition


@pytest.mark.slow  # ~3 min: two 800-step pretraining runs, two 600-step SFT runs
def test_bio_pretraining_learns_the_promoter_motif_and_sft_answers_questions_about_it(tmp_path):
    """experiment=bio_dna_pretrain on the synthetic genome vs the same bases shuffled per
    contig, scored on held-out promoter completion (measured 0.97 vs 0.01 exact match);
    then experiment=bio_sft from the genome run vs the same questions with shuffled answers,
    scored on held-out questions (measured 0.94 vs 0.50; 0.67 without the pretraining)."""
    import json

    from conftest import FAST, run_cli

    def score(run, task):
        run_cli("llmzoo-eval", f"run_dir={run}", f"eval_task=[{task}]")
        return json.loads((run / "eval" / "results.json").read_text())[task]["exact_match"]

    motif = {}
    for name in ("genome", "genome_shuffled"):
        run_cli("llmzoo-train", "experiment=bio_dna_pretrain", f"data.path=${{llmzoo.asset:{name}.fasta}}",
                f"run_dir={tmp_path / name}", *FAST)
        motif[name] = score(tmp_path / name, "motif_completion")
    sft = {}
    for name in ("bio_instructions", "bio_instructions_shuffled"):
        run_cli("llmzoo-train", "experiment=bio_sft", f"init_from={tmp_path / 'genome'}",
                f"data.path=${{llmzoo.asset:{name}.jsonl}}", f"run_dir={tmp_path / name}", *FAST)
        sft[name] = score(tmp_path / name, "promoter_questions")
    print(f"held-out promoter completion {motif}; held-out promoter questions {sft}")
    assert motif["genome"] > 0.5 and motif["genome_shuffled"] < 0.1
    assert sft["bio_instructions"] > 0.8 and sft["bio_instructions_shuffled"] < 0.65
