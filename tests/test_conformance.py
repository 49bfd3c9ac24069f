"""The built-in plugins pass the same conformance checks (``llmzoo.testing``) that a
third-party author runs, and the checks fail on broken plugins."""

import pytest
import torch

import llmzoo
from conftest import tiny_cfg
from llmzoo.testing import check_decoder, check_objective, check_tokenizer
from llmzoo_plugins.beam_search import BeamSearch
from llmzoo_plugins.chat_data import RecordsDataModule, encode_record
from llmzoo_plugins.clm import CausalLM
from llmzoo_plugins.dpo import DPO
from llmzoo_plugins.medusa import Medusa, MedusaObjective
from llmzoo_plugins.reward import RewardModel
from llmzoo_plugins.sampling import Greedy, Sample
from llmzoo_plugins.sft import SFT
from llmzoo_plugins.speculative import Speculative
from llmzoo_plugins.static_cache import StaticCache
from llmzoo_plugins.tokenizers import BPETokenizer, ByteTokenizer


@pytest.fixture(scope="module", params=["dense", "mamba"])
def model(request):
    torch.manual_seed(0)
    m = llmzoo.build_model(tiny_cfg(f"block={request.param}", "model.vocab_size=259")).eval()
    with torch.no_grad():
        m.head.weight.mul_(20)  # a sharper random model: fewer near-ties between tokens
    return m


def test_builtin_tokenizers_pass():
    check_tokenizer(ByteTokenizer(), texts=["Hello, world!", "naïve café ☕", "", "a\nb"])
    bpe = BPETokenizer(vocab_size=300)
    bpe.fit(["the cat sat on the mat", "a dog and a cat"] * 20)
    check_tokenizer(bpe, texts=["the cat", "a mat and a dog", "unseen wörds 123"])


def test_check_tokenizer_catches_a_lossy_tokenizer():
    class Lossy(ByteTokenizer):
        def encode(self, text):
            return super().encode(text.lower())

    with pytest.raises(AssertionError, match="decode\\(encode"):
        check_tokenizer(Lossy())


@pytest.mark.parametrize("make", [Greedy, lambda: StaticCache(compile=False), lambda: Speculative(k=3, draft_layers=1),
                                  lambda: BeamSearch(width=1)], ids=["greedy", "static", "speculative", "beam1"])
def test_greedy_decoders_equal_greedy_with_full_forwards(model, make):
    check_decoder(make(), model, equals_greedy=True)


def test_sampling_and_beam_decoders_pass(model):
    check_decoder(Sample(temperature=0.8, top_k=20, seed=1), model)
    check_decoder(BeamSearch(width=3), model)


def test_medusa_decoder_with_fresh_heads_equals_greedy():
    torch.manual_seed(0)
    m = llmzoo.build_model(tiny_cfg("model.vocab_size=259")).eval()
    heads = MedusaObjective(n_heads=4)
    heads.setup(m)
    check_decoder(Medusa(heads=heads), m, equals_greedy=True)


def slow_beam(model, prompt, width, max_new, eos, alpha=1.0):
    """Beam search with a full forward per beam and step: no decode state, no reorder."""
    beams, finished = [([], 0.0)], []
    for _ in range(max_new):
        cands = []
        for seq, score in beams:
            with torch.no_grad():
                logp = model(torch.tensor([prompt + seq])).logits[0, -1].float().log_softmax(-1)
            cands += [(score + float(lp), seq + [t]) for t, lp in enumerate(logp.tolist())]
        cands.sort(key=lambda c: -c[0])
        alive = []
        for rank, (score, seq) in enumerate(cands[: 2 * width]):
            if seq[-1] == eos or len(seq) == max_new:
                if rank < width:
                    finished.append((score / len(seq) ** alpha, seq))
            elif len(alive) < width:
                alive.append((seq, score))
        if len(finished) >= width or not alive:
            break
        beams = alive
    return max(finished)[1]


def test_beam_search_reorders_states_like_a_search_without_them(model):
    """Width 3: the states follow the beams through reorder(index) (rows duplicated and
    dropped); the result equals a search that re-runs every beam from scratch."""
    prompts = [[5, 17, 99, 3], [42], [7, 7, 200]]
    got = BeamSearch(width=3).generate(model, prompts, max_new_tokens=6, eos_id=None)
    assert got == [slow_beam(model, p, 3, 6, None) for p in prompts]


# ----------------------------------------------------------------------------- objectives
def _preference_batch():
    tok = ByteTokenizer()
    rows = [encode_record(tok, {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No thanks."}, "preferences", 64),
            encode_record(tok, {"prompt": "2 + 2?", "chosen": "4.", "rejected": "5, or so."}, "preferences", 64),
            encode_record(tok, {"prompt": "Colour?", "chosen": "Blue.", "rejected": "?"}, "preferences", 64),
            encode_record(tok, {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "Stone."}, "preferences", 64)]
    return RecordsDataModule(tok, path="-", kind="preferences", seq_len=64).collate(rows)


def _instruction_batch():
    tok = ByteTokenizer()
    recs = [{"instruction": "Add.", "input": "2 + 2", "output": "4."},
            {"instruction": "Say a long greeting.", "input": "", "output": "Hello there, dear friend!"},
            {"instruction": "Spell cat.", "input": "", "output": "c-a-t"},
            {"instruction": "Echo.", "input": "x", "output": "x"}]
    rows = [encode_record(tok, r, "instructions", 64) for r in recs]
    return RecordsDataModule(tok, path="-", kind="instructions", seq_len=64).collate(rows)


@pytest.mark.parametrize("name", ["clm", "sft", "dpo", "dpo_ipo", "reward", "medusa"])
def test_builtin_objectives_pass(name):
    torch.manual_seed(0)
    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    objective, batch = {
        "clm": (CausalLM(z_loss=1e-3), {"input_ids": ids}),
        "sft": (SFT(), _instruction_batch()),
        "dpo": (DPO(beta=0.2), _preference_batch()),
        "dpo_ipo": (DPO(beta=0.2, loss_type="ipo"), _preference_batch()),
        "reward": (RewardModel(), _preference_batch()),
        "medusa": (MedusaObjective(n_heads=2), {"input_ids": ids}),
    }[name]
    if hasattr(objective, "setup"):
        objective.setup(model, ByteTokenizer())
    check_objective(objective, model, batch)


def test_check_objective_catches_an_unweighted_token_mean():
    class PerRowSFT(SFT):  # averages tokens, but says nothing about it: micro-batches would disagree
        def weight(self, batch):
            return torch.tensor(float(len(batch["labels"])))

    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    with pytest.raises(AssertionError, match="define weight"):
        check_objective(PerRowSFT(), model, _instruction_batch())
