"""KTO, ORPO, SimPO, RLOO and on-policy distillation: each loss and its gradient against
the paper's formula written out independently here (explicit loops in float64), the
objective contract (llmzoo.testing.check_objective), and a short training run of each."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import llmzoo
import llmzoo.shared.losses
from conftest import FAST, run_cli, tiny_cfg
from llmzoo.interfaces import IGNORE_INDEX, ModelOutput
from llmzoo.testing import check_objective
from llmzoo_plugins.chat_data import RecordsDataModule, encode_record
from llmzoo_plugins.distill import Distill
from llmzoo_plugins.kto import KTO
from llmzoo_plugins.orpo import ORPO
from llmzoo_plugins.rewards import Keyword
from llmzoo_plugins.rloo import RLOO, leave_one_out_advantages
from llmzoo_plugins.sampling import Sample
from llmzoo_plugins.simpo import SimPO
from llmzoo_plugins.tokenizers import ByteTokenizer

RECORDS = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No thanks."},
           {"prompt": "2 + 2?", "chosen": "4.", "rejected": "5, or so."},
           {"prompt": "Colour?", "chosen": "Blue.", "rejected": "?"},
           {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "Stone."}]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def preference_batch(records=RECORDS):
    tok = ByteTokenizer()
    rows = [encode_record(tok, r, "preferences", 64) for r in records]
    return RecordsDataModule(tok, path="-", kind="preferences", seq_len=64).collate(rows)


def prompt_batch(prompts=("Tell a story.", "Say the word.", "Once upon")):
    tok = ByteTokenizer()
    rows = [encode_record(tok, {"prompt": p}, "prompts", 64) for p in prompts]
    return RecordsDataModule(tok, path="-", kind="prompts", seq_len=64).collate(rows)


def loop_logprob(logits: torch.Tensor, ids: list[int], labels: list[int]) -> tuple[torch.Tensor, int]:
    """Sum of log p(token t+1 | <= t) over labelled t+1, and how many, one position at a time."""
    total, n = logits.new_zeros(()), 0
    for t in range(len(labels) - 1):
        if labels[t + 1] != IGNORE_INDEX:
            total = total + (logits[t] - torch.logsumexp(logits[t], 0))[labels[t + 1]]
            n += 1
    return total, n


def pair_logprobs(logits: torch.Tensor, batch) -> list[tuple[tuple[torch.Tensor, int], tuple[torch.Tensor, int]]]:
    """[(chosen (sum, n), rejected (sum, n))] from the (chosen, rejected, ...) rows' logits."""
    out = []
    for i in range(len(batch["chosen_labels"])):
        out.append(tuple(loop_logprob(logits[2 * i + j], batch[f"{s}_input_ids"][i].tolist(),
                                      batch[f"{s}_labels"][i].tolist()) for j, s in enumerate(("chosen", "rejected"))))
    return out


def random_logits(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, 259, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2


def same_loss_and_grad(objective_loss, formula, logits: torch.Tensor) -> None:
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = objective_loss(a), formula(b)
    got.backward(), want.backward()
    # the objectives accumulate log-softmax in float32, the formulas here in float64
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- reference-free preference losses
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (0.5, 0.0)])
def test_simpo_loss_and_gradient_equal_the_paper_formula(beta, gamma):
    batch = preference_batch()
    logits = random_logits(8, batch["chosen_input_ids"].shape[1])
    obj = SimPO(beta=beta, gamma=gamma)

    def formula(lg):  # Meng et al. 2024, eq. 6
        terms = []
        for (sw, nw), (sl, nl) in pair_logprobs(lg, batch):
            terms.append(-torch.log(torch.sigmoid(beta / nw * sw - beta / nl * sl - gamma)))
        return sum(terms) / len(terms)

    same_loss_and_grad(lambda lg: obj.loss(ModelOutput(lg), batch).value, formula, logits)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_and_gradient_equal_the_paper_formula(lam):
    batch = preference_batch()
    logits = random_logits(8, batch["chosen_input_ids"].shape[1], seed=1)
    obj = ORPO(lam=lam)

    def formula(lg):  # Hong et al. 2024, eqs. 6-7: odds = P / (1 - P), P the mean-token likelihood
        terms = []
        for (sw, nw), (sl, nl) in pair_logprobs(lg, batch):
            pw, pl = torch.exp(sw / nw), torch.exp(sl / nl)
            odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
            terms.append(-sw / nw + lam * -torch.log(torch.sigmoid(torch.log(odds_w / odds_l))))
        return sum(terms) / len(terms)

    same_loss_and_grad(lambda lg: obj.loss(ModelOutput(lg), batch).value, formula, logits)


def test_orpo_log_odds_stay_finite_near_certainty():
    from llmzoo_plugins.orpo import log_odds

    x = torch.tensor([-1e-9, -1e-3, -30.0], dtype=torch.float64)
    assert torch.isfinite(log_odds(x)).all()
    assert log_odds(x)[1].item() == pytest.approx(math.log(math.exp(-1e-3) / (1 - math.exp(-1e-3))), rel=1e-9)


# ----------------------------------------------------------------------------- KTO
@pytest.mark.parametrize("z0", [0.0, 0.7])
def test_kto_loss_and_gradient_equal_the_paper_formula(z0):
    beta, lam_d, lam_u = 0.5, 1.0, 1.33
    batch = preference_batch()
    ref = {"ref_chosen": torch.tensor([-20.0, -9.0, -14.0, -18.0], dtype=torch.float64),
           "ref_rejected": torch.tensor([-25.0, -30.0, -5.0, -21.0], dtype=torch.float64),
           "kto_z0": torch.full((4,), z0, dtype=torch.float64)}
    batch = {**batch, **ref}
    logits = random_logits(8, batch["chosen_input_ids"].shape[1], seed=2)
    obj = KTO(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)

    def formula(lg):  # Ethayarajh et al. 2024, eq. 8: E[lambda_y - v(x, y)]
        terms = []
        for i, ((sw, _), (sl, _)) in enumerate(pair_logprobs(lg, batch)):
            rw, rl = sw - ref["ref_chosen"][i], sl - ref["ref_rejected"][i]
            terms += [lam_d - lam_d * torch.sigmoid(beta * (rw - z0)), lam_u - lam_u * torch.sigmoid(beta * (z0 - rl))]
        return sum(terms) / len(terms)

    same_loss_and_grad(lambda lg: obj.loss(ModelOutput(lg), batch).value, formula, logits)


def test_kto_reference_point_is_the_kl_on_mismatched_pairs():
    """z0 = max(0, mean over i of log pi - log ref of (prompt i, chosen response of i + 1))."""
    torch.manual_seed(0)
    policy = llmzoo.build_model(tiny_cfg("model.vocab_size=259")).eval()
    torch.manual_seed(1)
    reference = llmzoo.build_model(tiny_cfg("model.vocab_size=259")).eval()
    obj = KTO()
    obj.setup(policy, ByteTokenizer())
    obj.ref = [reference]
    prepared = obj.prepare(policy, preference_batch())
    tok, diffs = ByteTokenizer(), []
    for i, rec in enumerate(RECORDS):
        other = RECORDS[(i + 1) % len(RECORDS)]
        row = encode_record(tok, {"prompt": rec["prompt"], "chosen": other["chosen"], "rejected": "x"}, "preferences", 64)
        ids, labels = row["chosen_input_ids"], row["chosen_labels"]
        with torch.no_grad():
            lp = [loop_logprob(m(torch.tensor([ids])).logits[0].double(), ids, labels)[0] for m in (policy, reference)]
        diffs.append(float(lp[0] - lp[1]))
    want = max(0.0, sum(diffs) / len(diffs))
    assert want > 0  # two random models: a real KL estimate, not the clamp
    assert prepared["kto_z0"].tolist() == pytest.approx([want] * 4, abs=2e-5)  # float32 sums of ~100
    with torch.no_grad():  # the reference's own log-probs of chosen and rejected
        lp = pair_logprobs(reference(llmzoo.shared.losses.pair_rows(prepared)[0]).logits.double(), prepared)
    assert prepared["ref_chosen"].tolist() == pytest.approx([float(c[0]) for c, _ in lp], rel=1e-4)
    obj.ref = [policy]  # the policy as its own reference: KL 0, z0 clamps at 0 exactly
    assert obj.prepare(policy, preference_batch())["kto_z0"].abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- RLOO
def test_rloo_advantage_is_reward_minus_the_mean_of_the_others():
    r = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 5.0], dtype=torch.float64)
    for k in (2, 3):
        want = [r[i] - sum(r[j] for j in range(i - i % k, i - i % k + k) if j != i) / (k - 1) for i in range(6)]
        torch.testing.assert_close(leave_one_out_advantages(r, k), torch.stack(want))


def test_rloo_loss_and_gradient_equal_reinforce_with_the_loo_baseline():
    tok, k = ByteTokenizer(), 2
    prompts, responses = [tok.encode("ab"), tok.encode("ab"), tok.encode("xyz"), tok.encode("xyz")], \
        [tok.encode("c!"), tok.encode("dd e"), tok.encode("w"), tok.encode("q q")]
    ids, labels = llmzoo.shared.losses.prompt_response_batch(prompts, responses, tok.pad_id)
    rewards, kl = torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([0.3, -0.1, 0.2, 0.0])
    beta = 0.05
    shaped = rewards - beta * kl
    batch = {"sequences": ids, "response_labels": labels, "rewards": rewards, "kl": kl,
             "advantages": leave_one_out_advantages(shaped, k).double(), "response_lengths": torch.ones(4)}
    logits = random_logits(4, ids.shape[1], seed=3)
    obj = RLOO(reward=Keyword(word="a"), decoder=None, group_size=k, beta=beta)

    def formula(lg):  # Ahmadian et al. 2024: -1/k sum_i (R_i - mean_{j != i} R_j) log pi(y_i | x), per prompt
        total = 0
        for i in range(4):
            base = shaped[i - i % k: i - i % k + k].sum() - shaped[i]
            adv = float(shaped[i] - base / (k - 1))
            total = total - adv * loop_logprob(lg[i], ids[i].tolist(), labels[i].tolist())[0]
        return total / 4

    same_loss_and_grad(lambda lg: obj.loss(ModelOutput(lg), batch).value, formula, logits)


def test_rloo_prepare_folds_the_kl_into_the_reward():
    torch.manual_seed(0)
    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    obj = RLOO(reward=Keyword(word="e"), decoder=Sample(temperature=1.0), group_size=3, beta=0.5, max_new_tokens=6)
    obj.setup(model, ByteTokenizer())
    with torch.no_grad():
        for p in model.parameters():  # the policy moves away from its frozen start: KL != 0
            p.add_(0.05 * torch.randn_like(p))
    b = obj.prepare(model, prompt_batch())
    kl = []
    with torch.no_grad():
        for i in range(len(b["sequences"])):
            ids, labels = b["sequences"][i].tolist(), b["response_labels"][i].tolist()
            lp = [loop_logprob(m(torch.tensor([ids])).logits[0].double(), ids, labels)[0] for m in (model, obj.ref[0])]
            kl.append(float(lp[0] - lp[1]))
    assert b["kl"].tolist() == pytest.approx(kl, rel=1e-3, abs=1e-4) and max(map(abs, kl)) > 1e-2
    want = leave_one_out_advantages(b["rewards"].double() - 0.5 * torch.tensor(kl, dtype=torch.float64), 3)
    torch.testing.assert_close(b["advantages"].double(), want, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_distillation_divergence_and_gradient_equal_the_kl_formula(kind):
    tok = ByteTokenizer()
    prompts, responses = [tok.encode("ab"), tok.encode("hello")], [tok.encode("cd!"), tok.encode("x")]
    ids, labels = llmzoo.shared.losses.prompt_response_batch(prompts, responses, tok.pad_id)
    teacher_logp = torch.log_softmax(random_logits(2, ids.shape[1], seed=5), -1)
    batch = {"sequences": ids, "response_labels": labels, "teacher_logp": teacher_logp}
    obj = Distill(teacher=torch.nn.Identity(), decoder=None, divergence=kind)

    def formula(lg):  # KL over the vocabulary at every response position, mean per response, then over responses
        per_row = []
        for i in range(2):
            terms = []
            for t in range(ids.shape[1] - 1):
                if labels[i, t + 1] == IGNORE_INDEX:
                    continue
                pt, ps = teacher_logp[i, t].exp(), torch.softmax(lg[i, t], 0)
                p, q = (pt, ps) if kind == "forward" else (ps, pt)
                terms.append(sum(p[v] * torch.log(p[v] / q[v]) for v in range(259)))
            per_row.append(sum(terms) / len(terms))
        return sum(per_row) / 2

    same_loss_and_grad(lambda lg: obj.loss(ModelOutput(lg), batch).value, formula, random_logits(2, ids.shape[1], seed=6))


def test_distillation_refuses_a_teacher_with_another_vocabulary():
    student = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    teacher = llmzoo.build_model(tiny_cfg("model.vocab_size=300"))
    with pytest.raises(ValueError, match="vocabulary size 300, the student 259"):
        Distill(teacher=teacher, decoder=None).setup(student, ByteTokenizer())
    with pytest.raises(llmzoo.config.ConfigError, match="objective=distill needs objective.teacher"):
        tiny_cfg("objective=distill", "data=prompts")


# ----------------------------------------------------------------------------- the contract, and training
@pytest.mark.parametrize("name", ["simpo", "orpo", "kto", "rloo", "distill"])
def test_new_objectives_pass_the_objective_check(name):
    torch.manual_seed(0)
    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    objective, batch = {
        "simpo": (SimPO(), preference_batch()),
        "orpo": (ORPO(), preference_batch()),
        "kto": (KTO(), preference_batch()),
        "rloo": (RLOO(reward=Keyword(word="e"), decoder=Sample(), group_size=2, max_new_tokens=5), prompt_batch()),
        "distill": (Distill(teacher=llmzoo.build_model(tiny_cfg("model.vocab_size=259")), decoder=Sample(),
                            max_new_tokens=5), prompt_batch()),
    }[name]
    if hasattr(objective, "setup"):
        objective.setup(model, ByteTokenizer())
    check_objective(objective, model, batch)


def test_each_new_objective_trains_from_the_cli(tmp_path):
    """Three steps of each: configs, data, validation and saving -- the first through the
    llmzoo-train command, the others through ``llmzoo.train`` in this process (the same
    path without the command's start-up); the first run is the distillation teacher."""
    common = ["model=tiny", "trainer.max_steps=3", "trainer.val_every=3", "data.batch_size=4", *FAST]
    for i, (name, data) in enumerate([
            ("simpo", "preferences"), ("orpo", "preferences"), ("kto", "preferences"),
            ("rloo", "prompts reward=keyword objective.group_size=2 objective.max_new_tokens=8"),
            (f"distill objective.teacher={tmp_path / 'simpo'} objective.max_new_tokens=8", "prompts")]):
        run = tmp_path / name.split()[0]
        overrides = [*f"objective={name} data={data}".split(), f"run_dir={run}", *common]
        if i == 0:
            run_cli("llmzoo-train", *overrides)
        else:
            llmzoo.train(llmzoo.compose(overrides=overrides))
        assert (run / "model.safetensors").exists()
        with open(run / "metrics.csv") as fh:
            val = [float(r["val_loss"]) for r in csv.DictReader(fh) if r.get("val_loss")]
        assert val and all(math.isfinite(v) for v in val), (name, val)
