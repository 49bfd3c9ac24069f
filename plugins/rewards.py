"""Rule-based rewards for RL objectives (``reward=exact_answer|keyword|length``): a
reward is any object called as ``reward(prompt, response, answer) -> float`` on text
(``answer`` is the prompt record's optional field). Third-party rewards are classes
named by ``_target_`` in a ``reward/`` config of their own."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


class ExactAnswer:
    """1 when the last number in the response equals the record's answer, else 0."""

    def __call__(self, prompt: str, response: str, answer: str | None) -> float:
        numbers = NUMBER.findall(response)
        return float(answer is not None and bool(numbers) and numbers[-1] == str(answer).strip())


class Keyword:
    """1 when the response contains ``word`` (case-insensitive), else 0."""

    def __init__(self, word: str = "fox"):
        self.word = word.lower()

    def __call__(self, prompt: str, response: str, answer: str | None) -> float:
        return float(self.word in response.lower())


class Length:
    """1 - |len(response) - target| / target in characters, at least 0."""

    def __init__(self, target: int = 20):
        self.target = target

    def __call__(self, prompt: str, response: str, answer: str | None) -> float:
        return max(0.0, 1 - abs(len(response) - self.target) / self.target)
