"""Proximal Policy Optimization for language models (``objective=ppo`` with
``data=prompts``; Schulman et al. 2017, as used for RLHF by Ziegler et al. 2019 and
Ouyang et al. 2022).

Each training batch of prompts:
  1. rollout: sample responses with the configured decoder; score each with the reward
     (``reward=...`` rule, or ``reward_model=<run trained with objective=reward>``);
     record the policy's log-probs, the frozen reference's log-probs and the values;
  2. per-token rewards r_t = -kl_coef * (log pi_old - log ref), plus the sequence
     reward at the response's last token;
  3. GAE: delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1};
     returns R_t = A_t + V_t; advantages whitened over the batch (``whiten``);
  4. ``epochs`` passes over the rollout in ``minibatches``, each one optimizer step of
        policy  max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)),  ratio = pi / pi_old
        value   0.5 * max((V - R)^2, (clip(V, V_old - vclip, V_old + vclip) - R)^2)
     loss = policy + vf_coef * value, averaged over response tokens;
  5. adaptive KL (``target_kl`` set): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.
The value head is a linear layer on the last hidden state, saved with the run. This is
manual optimization inside Lightning: one training batch makes epochs x minibatches
optimizer steps, and ``trainer.max_steps`` counts those steps.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.decoding import sample_responses
from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.shared.losses import prompt_response_batch, token_logprobs


# ============================================================================ the formulas
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row (the value
    after a row's last position is 0). All (B, T); returns (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = m * (delta + gamma * lam * running) + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = running * m
    return adv, (adv + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(loss, mask), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ============================================================================ the objective
class PPO(nn.Module):
    needs = frozenset({"prompt_ids", "prompt_lens"})
    manual_optimization = True

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        if cfg.get("reward") is None and not node.get("reward_model"):
            return ["objective=ppo needs a reward: reward=exact_answer|keyword|length, or "
                    "objective.reward_model=<a run trained with objective=reward>"]
        return []

    def __init__(self, reward: Any, decoder: Any, reward_model: str | None = None, max_new_tokens: int = 32,
                 epochs: int = 2, minibatches: int = 2, clip: float = 0.2, value_clip: float = 0.2,
                 vf_coef: float = 0.5, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.05,
                 target_kl: float | None = None, horizon: int = 10000, whiten_advantages: bool = True,
                 seed: int | None = 0):
        super().__init__()
        if reward is None and reward_model is None:
            raise ValueError("objective=ppo needs reward=<rule> or objective.reward_model=<run trained with "
                             "objective=reward>")
        self.reward, self.decoder, self.reward_model_path = reward, decoder, reward_model
        self.max_new_tokens, self.epochs, self.minibatches = max_new_tokens, epochs, minibatches
        self.clip, self.value_clip, self.vf_coef, self.gamma, self.lam = clip, value_clip, vf_coef, gamma, lam
        self.kl_coef, self.target_kl, self.horizon, self.whiten = kl_coef, target_kl, horizon, whiten_advantages
        self.seed, self.rollouts = seed, 0
        self.value_head: nn.Linear | None = None
        self.ref: list[nn.Module] = []  # frozen models: neither trained nor saved
        self.scorer: list[Any] = []
        self.tokenizer = None

    def setup(self, model: nn.Module, tokenizer: Any) -> None:
        if self.value_head is None:
            self.value_head = nn.Linear(model.dim, 1).to(model.embedding.weight.device)
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
        self.ref = [copy.deepcopy(model).eval().requires_grad_(False)]
        self.tokenizer = tokenizer
        if self.reward_model_path and not self.scorer:
            from llmzoo.api import load_any

            run = load_any(self.reward_model_path)
            if run.objective is None or not hasattr(run.objective, "score"):
                raise ValueError(f"objective.reward_model={self.reward_model_path}: not a run trained with "
                                 "objective=reward")
            self.scorer = [run]

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rewards(self, prompts, responses, answers, ids, labels) -> torch.Tensor:
        if self.scorer:  # a learned reward model reads the whole sequence at its last token
            run = self.scorer[0]
            rm, head = run.model.to(ids.device), run.objective
            last = torch.tensor([len(p) + len(r) - 1 for p, r in zip(prompts, responses)], device=ids.device)
            return head.to(ids.device).score(rm, ids, last).float()
        return torch.tensor([self.reward(self.tokenizer.decode(p), self.tokenizer.decode(r), a)
                             for p, r, a in zip(prompts, responses, answers)], dtype=torch.float32, device=ids.device)

    def scored(self, out: ModelOutput, labels: torch.Tensor):
        """Per-token log-probs, values and the mask of response positions from the model's output."""
        logp, mask = token_logprobs(out.logits, labels)
        values = self.value_head(out.hidden).squeeze(-1).float() * mask
        return logp, values, mask

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """The rollout: sample a response per prompt, score it, and compute pi_old's
        log-probs, values, advantages and returns (one row per response)."""
        ids = batch["prompt_ids"]
        prompts, responses, answers = sample_responses(
            model, self.decoder, batch, eos_id=self.tokenizer.eos_id, max_new_tokens=self.max_new_tokens,
            seed=None if self.seed is None else self.seed + self.rollouts)
        self.rollouts += 1
        seq, labels = prompt_response_batch(prompts, responses, self.tokenizer.pad_id, ids.device)
        logp, values, mask = self.scored(model(seq), labels)  # pi_old, in the mode updates run in
        ref_logp, _ = token_logprobs(self.ref[0].to(ids.device)(seq).logits, labels)
        score = self.rewards(prompts, responses, answers, seq, labels)
        kl = (logp - ref_logp) * mask
        token_rewards = -self.kl_coef * kl
        last = mask.long().cumsum(-1).argmax(-1)  # each row's last response position
        token_rewards[torch.arange(len(seq)), last] += score
        adv, returns = gae(token_rewards, values, mask, self.gamma, self.lam)
        if self.whiten:
            adv = whiten(adv, mask)
        return {"ids": seq, "labels": labels, "logp": logp, "values": values, "adv": adv, "returns": returns,
                "score": score, "kl": kl.sum(-1), "length": mask.sum(-1).float()}

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch["ids"]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        """Clipped policy loss + vf_coef * clipped value loss on rollout rows."""
        logp, values, mask = self.scored(out, batch["labels"])
        pg, clipfrac = policy_loss(logp, batch["logp"], batch["adv"], mask, self.clip)
        vf = value_loss(values, batch["values"], batch["returns"], mask, self.value_clip)
        return Loss(pg + self.vf_coef * vf, {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "clipfrac": clipfrac.detach(),
                                              "reward": batch["score"].mean(), "kl": batch["kl"].mean(),
                                              "response_tokens": batch["length"].mean()},
                    measure=-batch["score"].mean())  # val_loss: minus the mean reward

    # ------------------------------------------------------------------ optimisation
    def train_step(self, module, batch: Batch) -> Loss:
        """One rollout, then epochs x minibatches optimizer steps (manual optimization)."""
        model = module.model
        ro = self.prepare(model, batch)
        n = len(ro["ids"])
        stats: dict[str, list[torch.Tensor]] = {}
        max_steps = module.trainer.max_steps if module.trainer.max_steps and module.trainer.max_steps > 0 else None
        parts = [p for _ in range(self.epochs)
                 for p in torch.randperm(n, device=ro["ids"].device).chunk(self.minibatches)]
        if max_steps is not None:  # trainer.max_steps counts optimizer steps: do not overshoot it
            parts = parts[: max(1, max_steps - module.trainer.global_step)]
        for part in parts:
            rows = {k: v[part] for k, v in ro.items()}
            loss = self.loss(model(rows["ids"]), rows)
            module.clip_and_step(loss.value)
            for k in ("pg_loss", "vf_loss", "clipfrac"):
                stats.setdefault(k, []).append(loss.metrics[k])
        kl = ro["kl"].mean()
        if self.target_kl:  # adaptive KL controller
            error = float((kl / self.target_kl - 1).clamp(-0.2, 0.2))
            self.kl_coef *= 1 + error * n / self.horizon
        metrics = {k: torch.stack(v).mean() for k, v in stats.items()}
        metrics.update(reward=ro["score"].mean(), kl=kl, kl_coef=torch.tensor(self.kl_coef),
                       response_tokens=ro["length"].mean())
        return Loss(metrics["pg_loss"] + self.vf_coef * metrics["vf_loss"], metrics)
