"""On-policy knowledge distillation (``objective=distill`` with ``data=prompts`` and
``objective.teacher=<run>``; Agarwal et al. 2024, GKD; Gu et al. 2024, MiniLLM).

Each training step the student samples a response to every prompt (on-policy: the
student learns on the sequences it produces), the frozen teacher scores the same
tokens, and at every response position the student's next-token distribution p_S is
pulled towards the teacher's p_T over the whole vocabulary:

    forward KL   D = sum_v p_T(v) * (log p_T(v) - log p_S(v))     (mean-seeking)
    reverse KL   D = sum_v p_S(v) * (log p_S(v) - log p_T(v))     (mode-seeking)

averaged over each response's positions, then over responses. Teacher and student share
the tokenizer (checked at setup: same vocabulary size). Validation reports the same
divergence on the held-out prompts' samples.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmzoo.api import frozen_reference
from llmzoo.shared.decoding import sample_responses
from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss, ModelOutput
from llmzoo.shared.losses import prompt_response_batch, shifted_labels

DIVERGENCES = ("forward", "reverse")


def divergence(student_logits: torch.Tensor, teacher_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, T) per-position KL between next-token distributions, from logits (B, T, V) and
    the teacher's log-probabilities (B, T, V)."""
    s = torch.log_softmax(student_logits.float(), -1)
    if kind == "forward":
        return (teacher_logp.exp() * (teacher_logp - s)).sum(-1)
    return (s.exp() * (s - teacher_logp)).sum(-1)


class Distill:
    needs = frozenset({"prompt_ids", "prompt_lens"})

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        if not node.get("teacher"):
            return ["objective=distill needs objective.teacher=<run folder, .ckpt or hf:folder> (the model to learn from)"]
        return []

    def __init__(self, teacher: str | nn.Module | None, decoder: Any, divergence: str = "reverse",
                 max_new_tokens: int = 32, seed: int | None = 0):
        if divergence not in DIVERGENCES:
            raise ValueError(f"objective.divergence={divergence!r} is not one of {list(DIVERGENCES)}")
        if teacher is None:
            raise ValueError("objective=distill needs objective.teacher=<run folder, .ckpt or hf:folder>")
        self.teacher_source, self.decoder, self.kind = teacher, decoder, divergence
        self.max_new_tokens, self.seed, self.rollouts = max_new_tokens, seed, 0
        self.teacher: list[nn.Module] = []  # a list: the teacher is neither trained nor saved
        self.tokenizer = None

    def setup(self, model: nn.Module, tokenizer: Any) -> None:
        src = self.teacher_source
        teacher = src.eval().requires_grad_(False) if isinstance(src, nn.Module) else frozen_reference(model, src)
        if teacher.vocab_size != model.vocab_size:
            raise ValueError(f"objective.teacher has vocabulary size {teacher.vocab_size}, the student "
                             f"{model.vocab_size}: distillation compares distributions over one vocabulary")
        self.teacher, self.tokenizer = [teacher], tokenizer

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """Sample one response per prompt with the student; the teacher's log-probs on them."""
        prompts, responses, _ = sample_responses(
            model, self.decoder, batch, eos_id=self.tokenizer.eos_id, max_new_tokens=self.max_new_tokens,
            seed=None if self.seed is None else self.seed + self.rollouts)
        self.rollouts += 1
        device = batch["prompt_ids"].device
        ids, labels = prompt_response_batch(prompts, responses, self.tokenizer.pad_id, device)
        teacher_logp = torch.log_softmax(self.teacher[0].to(device)(ids).logits.float(), -1)
        return {"sequences": ids, "response_labels": labels, "teacher_logp": teacher_logp}

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch["sequences"]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        mask = shifted_labels(batch["response_labels"]) != IGNORE_INDEX
        per_position = divergence(out.logits, batch["teacher_logp"], self.kind) * mask
        loss = (per_position.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        return Loss(loss, {"response_tokens": mask.sum(-1).float().mean()})
