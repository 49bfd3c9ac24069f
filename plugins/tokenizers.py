"""Tokenizers: ``tokenizer=byte`` (UTF-8 bytes, nothing to train), ``tokenizer=bpe``
(byte-level BPE trained with Hugging Face ``tokenizers`` on the training text and
saved in the run folder) and ``tokenizer=file`` (any local ``tokenizer.json``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmzoo.data import ChatTemplate

META = "llmzoo_tokenizer.json"


class ByteTokenizer(ChatTemplate):
    """Token i < 256 is byte i; then <bos>, <eos>, <pad>."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / META).write_text(json.dumps({"kind": "byte"}))

    def hf_tokenizer(self) -> HFTokenizer:
        """The same ids as a ``tokenizers`` byte-level BPE with no merges: byte b is token b
        (spelled with GPT-2's printable byte alphabet), then <bos>, <eos>, <pad>."""
        vocab = {ch: b for b, ch in enumerate(byte_alphabet())}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
        return tok

    @classmethod
    def load(cls, directory: str | Path) -> "ByteTokenizer":
        return cls()


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte 0..255 (printable
    bytes stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


# ----------------------------------------------------------------------------- chat templates from files
# A chat template comes with a downloaded model: it is rendered in Jinja's immutable
# sandbox (no attribute access to internals, no mutation), and within a budget of time
# and output so that a template written to loop for ever or to print gigabytes fails
# alone, with one message, instead of blocking a server.
TEMPLATE_SECONDS = 1.0
TEMPLATE_MAX_CHARS = 1_000_000
_SAMPLE_CHAT = [{"role": "user", "content": "Hello"}]  # what every chat template must accept


class ChatTemplateError(ValueError):
    """A chat template that does not compile, that the sandbox refuses, or that goes
    past its budget of time or output."""


def _sandbox() -> Any:
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError(f"the exponent {right} is too large for a chat template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise SecurityError(f"a repetition of {len(seq) * n} items is too long for a chat template")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:  # as transformers gives templates: their own refusals
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


def compile_chat_template(source: str) -> Callable[..., str]:
    """``render(**variables) -> str`` for a Jinja chat template, bounded in time
    (``TEMPLATE_SECONDS``, checked on every line the template runs) and in output
    (``TEMPLATE_MAX_CHARS``); every failure is a ``ChatTemplateError``."""
    from jinja2.exceptions import TemplateError

    if not isinstance(source, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(source).__name__}")
    try:
        template = _sandbox().from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def render(**variables: Any) -> str:
        deadline = time.monotonic() + TEMPLATE_SECONDS
        out: list[str] = []
        size = 0

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise ChatTemplateError(f"the chat template ran past its {TEMPLATE_SECONDS:g} s budget")
            return tracer

        before = sys.gettrace()
        sys.settrace(tracer)
        try:
            for piece in template.generate(**variables):
                size += len(piece)
                if size > TEMPLATE_MAX_CHARS:
                    raise ChatTemplateError(f"the chat template rendered more than {TEMPLATE_MAX_CHARS} characters")
                out.append(piece)
        except ChatTemplateError:
            raise
        except (TemplateError, MemoryError, RecursionError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(before)
        return "".join(out)

    return render


def check_chat_template(source: str, tokens: dict[str, str] | None = None) -> None:
    """Refuse a template that does not compile or does not render a short conversation
    within its budget (done when a tokenizer is made, so at import and at load)."""
    names = {f"{k}_token": v for k, v in (tokens or {}).items()}
    render = compile_chat_template(source)
    render(messages=_SAMPLE_CHAT, add_generation_prompt=True, **names)


class JsonTokenizer(ChatTemplate):
    """Any Hugging Face ``tokenizer.json``. ``path`` is the file or the folder holding it.
    Special tokens are looked up by name; a missing <bos> or <pad> falls back to <eos>.
    ``chat_template``: a Jinja chat template (a Hugging Face tokenizer_config.json's),
    rendered in Jinja's sandbox, instead of llmzoo's own chat format; ``add_bos``: prompts
    start with <bos> (``add_bos_token``)."""

    def __init__(self, path: str | Path | None = None, bos_token: str = "<bos>",
                 eos_token: str = "<eos>", pad_token: str = "<pad>", chat_template: str | None = None,
                 add_bos: bool = False):
        self.tokens = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        self.chat_template, self.add_bos = chat_template, add_bos
        if chat_template is not None:
            check_chat_template(chat_template, self.tokens)
        self.tok: HFTokenizer | None = None
        if path is not None:
            file = Path(path)
            file = file / "tokenizer.json" if file.is_dir() else file
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {file}")
            self._set(HFTokenizer.from_file(str(file)))

    @property
    def is_trained(self) -> bool:
        return self.tok is not None

    def _set(self, tok: HFTokenizer) -> None:
        self.tok = tok
        eos = tok.token_to_id(self.tokens["eos"])
        if eos is None:
            raise ValueError(f"tokenizer has no eos token {self.tokens['eos']!r}: set tokenizer.eos_token")
        self.eos_id = eos
        self.bos_id = tok.token_to_id(self.tokens["bos"]) if tok.token_to_id(self.tokens["bos"]) is not None else eos
        self.pad_id = tok.token_to_id(self.tokens["pad"]) if tok.token_to_id(self.tokens["pad"]) is not None else eos
        self.vocab_size = tok.get_vocab_size()

    def _need(self) -> HFTokenizer:
        if self.tok is None:
            raise RuntimeError("tokenizer is not trained yet: call fit(texts) or give tokenizer.path")
        return self.tok

    def encode(self, text: str) -> list[int]:
        return self._need().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._need().encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._need().decode([int(i) for i in ids], skip_special_tokens=True)

    def hf_tokenizer(self) -> HFTokenizer:
        return self._need()

    def chat_template_jinja(self) -> str:
        return self.chat_template or super().chat_template_jinja()

    def render_chat(self, messages: Sequence[dict], generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """With a Jinja ``chat_template``: the rendering of each growing prefix of the
        conversation; an assistant turn is trained on from where the template's generation
        prompt ends."""
        if self.chat_template is None:
            return super().render_chat(messages, generation_prompt)
        render = self._jinja()
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                head = render(messages[:i], True)
                pieces.append((self._after(done, head), False))
                done = head
            text = render(messages[:i + 1], False)
            pieces.append((self._after(done, text), m.get("role") == "assistant"))
            done = text
        if generation_prompt:
            pieces.append((self._after(done, render(messages, True)), False))
        return [p for p in pieces if p[0]]

    @staticmethod
    def _after(done: str, text: str) -> str:
        if not text.startswith(done):
            raise ValueError("the chat template renders a conversation differently from its beginning, so it cannot "
                             "mark which tokens are the assistant's")
        return text[len(done):]

    def _jinja(self) -> Callable[[Sequence[dict], bool], str]:
        render = compile_chat_template(str(self.chat_template))
        names = {f"{k}_token": v for k, v in self.tokens.items()}
        bos = self.tokens["bos"]

        def rendered(msgs: Sequence[dict], gen: bool) -> str:
            # A template that opens with bos_token (Llama's, an llmzoo export's): llmzoo puts the
            # bos id before every chat itself, so the text starts after it (one bos, not two).
            text = render(messages=list(msgs), add_generation_prompt=gen, **names)
            return text[len(bos):] if bos and text.startswith(bos) else text

        return rendered

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._need().save(str(d / "tokenizer.json"))
        # vocab_size may exceed the file's (a BPE padded to its target size): kept as saved
        (d / META).write_text(json.dumps({"kind": "json", "tokens": self.tokens, "vocab_size": self.vocab_size,
                                          "chat_template": self.chat_template, "add_bos": self.add_bos}))

    @classmethod
    def load(cls, directory: str | Path) -> "JsonTokenizer":
        meta = json.loads((Path(directory) / META).read_text())
        t = meta["tokens"]
        tok = JsonTokenizer(Path(directory) / "tokenizer.json", t["bos"], t["eos"], t["pad"],
                            meta.get("chat_template"), bool(meta.get("add_bos", False)))
        tok.vocab_size = max(tok.vocab_size, meta.get("vocab_size", 0))
        return tok


class BPETokenizer(JsonTokenizer):
    """Byte-level BPE. Untrained until ``fit`` (done by the data module on the training
    text) unless ``path`` points to a trained ``tokenizer.json``."""

    def __init__(self, vocab_size: int = 1024, min_frequency: int = 2, path: str | Path | None = None):
        super().__init__(path)
        self.target_vocab_size, self.min_frequency = vocab_size, min_frequency
        if path is None:
            self.vocab_size = vocab_size  # known before training: the model can be built first

    def fit(self, texts: Iterable[str]) -> None:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size, min_frequency=self.min_frequency,
            special_tokens=list(self.tokens.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        self._set(tok)
        # A small corpus can stop BPE short of the target; pad so the model size is as configured.
        self.vocab_size = max(self.vocab_size, self.target_vocab_size)


def load_tokenizer(directory: str | Path):
    """Rebuild whatever tokenizer ``save`` wrote into ``directory``."""
    meta = json.loads((Path(directory) / META).read_text())
    return ByteTokenizer.load(directory) if meta["kind"] == "byte" else JsonTokenizer.load(directory)
