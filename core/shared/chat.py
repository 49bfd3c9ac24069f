"""The default chat format: how a conversation becomes text (tokenizers inherit it)."""

from __future__ import annotations

from typing import Sequence


class ChatTemplate:
    """How a conversation becomes text, owned by the tokenizer (chat data and
    ``llmzoo-generate`` use it): a tokenizer inherits it to get ``render_chat``, which
    returns (text, trained) pieces -- the assistant's words are trained on, the rest is
    prompt. Subclasses change ``ROLE`` (the header of each turn) and ``END`` (what
    closes a turn)."""

    ROLE = "<|{role}|>\n"
    END = "\n"

    def render_chat(self, messages: Sequence[dict], generation_prompt: bool = False) -> list[tuple[str, bool]]:
        pieces = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i}: needs role in system/user/assistant and a string content, got {m!r}")
            pieces.append((self.ROLE.format(role=role), False))
            pieces.append((content + self.END, role == "assistant"))
        if generation_prompt:
            pieces.append((self.ROLE.format(role="assistant"), False))
        return pieces

    def chat_template_jinja(self) -> str:
        """The same format as a Jinja chat template (what ``llmzoo export-hf`` writes). It starts
        with ``bos_token``, which llmzoo puts before every chat (SFT rows, chat prompts), so
        ``transformers``' ``apply_chat_template`` gives llmzoo's token ids."""
        def literal(text: str) -> str:
            return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

        head, tail = self.ROLE.split("{role}")
        turn = f"{literal(head)} + message['role'] + {literal(tail)} + message['content'] + {literal(self.END)}"
        return ("{{ bos_token }}{% for message in messages %}{{ " + turn + " }}{% endfor %}"
                "{% if add_generation_prompt %}{{ "
                + literal(self.ROLE.format(role="assistant")) + " }}{% endif %}")
