"""``llmzoo-serve run_dir=<run>``: an OpenAI-compatible HTTP server with continuous
batching, for every block whose decode state has independent rows (``row_state``: dense,
MoE, Mamba, Mamba-2, hybrid).

Endpoints (FastAPI on uvicorn): ``POST /v1/completions``, ``POST /v1/chat/completions``
(the tokenizer's chat template), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus). ``"stream": true`` answers with server-sent events.

How a request is decoded (``Engine``, one thread beside the event loop):
  * it waits in a bounded queue; a full server answers 429;
  * between two decode steps the waiting requests are admitted to free rows of the
    running batch: their prompts are prefilled together (up to ``prefill_batch`` at once,
    right-padded, each row rewinding its padding; prompts of equal length only where a
    state cannot rewind, as recurrent ones), and each prefilled row is ``put`` into a free
    row (``init_states(..., rows=True)``: every row at its own position);
  * each decode step runs one token for every active row at once; each request has its
    own sampler (temperature, top_p, top_k, seed), ``max_tokens`` and ``stop`` strings;
  * a finished or cancelled request (its client went away) leaves at once: the last
    row moves into its place, so the active rows are always the first ``n`` and a step
    runs exactly those (``state.head(n)``).
``batching=static`` admits new requests only when the whole batch has finished (the
baseline that continuous batching is measured against).
"""


import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from llmzoo.interfaces import ROW_STATE, capabilities_of
from llmzoo.shared.decoding import MAX_SEED, MAX_TEMPERATURE, Sampler

log = logging.getLogger(__name__)

BATCHING = ("continuous", "static")


class QueueFull(Exception):
    """The server holds as many requests as it may (HTTP 429)."""


@dataclass
class Request:
    """One sequence to generate. ``emit(text, finish_reason)`` is called from the engine's
    thread with each new piece of text; ``finish_reason`` ("stop" | "length") on the last."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[str, str | None], None]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # go on to max_tokens past eos (load tests)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    finish: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 32, max_queue: int = 256,
                 max_len: int | None = None, batching: str = "continuous", metrics: Any = None,
                 prefill_batch: int = 8):
        missing = [type(b).__name__ for b in model.blocks if ROW_STATE not in capabilities_of(b)]
        if missing:
            raise ValueError(f"llmzoo-serve needs blocks whose decode state has independent rows ({ROW_STATE!r}); "
                             f"{sorted(set(missing))} lack it")
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r} is not one of {list(BATCHING)}")
        if max_batch < 1 or max_queue < 0 or prefill_batch < 1:
            raise ValueError(f"max_batch and prefill_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{prefill_batch} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.batching = max_batch, max_queue, batching
        self.max_len = min(max_len or model.max_seq_len, model.max_seq_len)
        self.device = next(model.parameters()).device
        self.states = model.init_states(max_batch, self.max_len, device=self.device, rows=True)
        self.rewindable = all(s is None or hasattr(s, "rewind") for s in self.states)
        self.prefill_batch = prefill_batch
        self.active: list[Request] = []  # row i of the states holds active[i]
        self.queue: deque[Request] = deque()
        self.wakeup = threading.Condition()
        self.metrics = metrics
        self.peak_batch, self.steps, self.prefills = 0, 0, 0  # prefills: prefill forwards
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ from the HTTP side
    def submit(self, req: Request) -> None:
        """Queue a request; ``QueueFull`` when the free rows and the queue are taken."""
        with self.wakeup:
            if len(self.queue) >= self.max_queue + self.max_batch - len(self.active):
                raise QueueFull(f"the server is full ({len(self.active)} running, {len(self.queue)} waiting)")
            self.queue.append(req)
            self.wakeup.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: the request leaves its row (or the queue) before the next step."""
        req.cancelled = True
        with self.wakeup:
            self.wakeup.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llmzoo-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        with self.wakeup:
            self.wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.wakeup:
                while not (self.queue or self.active or self._stop.is_set()):
                    self.wakeup.wait()
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("decode step failed")
                for req in self.active:
                    req.finish = "error"
                    req.emit(f"[llmzoo-serve: decoding failed: {type(e).__name__}: {e}]", "error")
                self.active.clear()
                for state in self.states:
                    state.reset()

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests to free rows, then one decode step for every active row."""
        self._leave()
        self._admit()
        if self.active:
            self._decode()
            self._leave()
        if self.metrics is not None:
            self.metrics.running.set(len(self.active))
            self.metrics.waiting.set(len(self.queue))

    def _admit(self) -> None:
        """Every waiting request that fits is admitted and prefilled now, in batches."""
        if self.batching == "static" and self.active:
            return
        with self.wakeup:
            reqs = []
            while self.queue and len(self.active) + len(reqs) < self.max_batch:
                req = self.queue.popleft()
                if not req.cancelled:
                    reqs.append(req)
        for group in self._prefill_groups(reqs):
            self._prefill(group)

    def _prefill_groups(self, reqs: list[Request]) -> list[list[Request]]:
        """Prompts prefilled together: all of them where every state can ``rewind`` (each
        row forgets its own right padding), else those of equal length (a recurrent state
        cannot skip padding). At most ``prefill_batch`` per group."""
        if self.rewindable:
            groups = [reqs]
        else:
            by_len: dict[int, list[Request]] = {}
            for req in reqs:
                by_len.setdefault(len(req.prompt), []).append(req)
            groups = list(by_len.values())
        n = self.prefill_batch
        return [g[i:i + n] for g in groups for i in range(0, len(g), n)]

    def _prefill(self, group: list[Request]) -> None:
        """Prefill ``group`` in one forward (right-padded to the longest prompt), move each
        prefilled row into a free row of the batch, and choose each first token."""
        lens = [len(r.prompt) for r in group]
        width, pad = max(lens), 0  # any id: the padding is rewound
        fresh = self.model.init_states(len(group), width, device=self.device, rows=True)
        ids = torch.tensor([r.prompt + [pad] * (width - n) for r, n in zip(group, lens)], device=self.device)
        logits = self.model(ids, states=fresh).logits
        self.prefills += 1
        last = logits[torch.arange(len(group), device=self.device), torch.tensor(lens, device=self.device) - 1]
        if min(lens) < width:
            for state in fresh:
                if state is not None:
                    state.rewind([width - n for n in lens])
        for i, req in enumerate(group):
            row = len(self.active)
            for state, prefilled in zip(self.states, fresh):
                if state is not None:
                    state.put(row, prefilled, i)
            self.active.append(req)
            self.peak_batch = max(self.peak_batch, len(self.active))
            token = self._choose(req, last[i:i + 1].float())
            if token is not None:
                self._accept(req, token)
            if req.finish:  # done at its first token (eos, a stop string, max_tokens=1): free the row
                self.active.pop()

    def _decode(self) -> None:
        n = len(self.active)
        tokens = torch.tensor([[r.tokens[-1]] for r in self.active], device=self.device)
        states = self.states if n == self.max_batch else [s.head(n) for s in self.states]
        logits = self.model(tokens, states=states).logits[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for i, req in enumerate(self.active):
            token = greedy[i] if req.sampler.greedy else self._choose(req, logits[i:i + 1])
            if token is not None:
                self._accept(req, token)

    def _choose(self, req: Request, logits: torch.Tensor) -> int | None:
        """``req``'s next token; a sampler that fails ends this request alone (None)."""
        try:
            return int(req.sampler(logits)[0])
        except (RuntimeError, ValueError) as e:
            log.warning("request %s: sampling failed: %s", req.id, e)
            req.finish = "error"
            req.emit(f"[llmzoo-serve: sampling failed: {type(e).__name__}: {e}]", "error")
            return None

    def _accept(self, req: Request, token: int) -> None:
        """Append a token, decide whether the request is done, emit the new text."""
        now = time.perf_counter()
        if req.first_token is None:
            req.first_token = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - req.created)
        req.tokens.append(token)
        if self.metrics is not None:
            self.metrics.count_token()
        eos = token == self.tokenizer.eos_id and not req.ignore_eos
        ids = req.tokens[:-1] if eos else req.tokens
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if eos or cut >= 0:
            req.finish = "stop"
        elif len(req.tokens) >= req.max_tokens or len(req.prompt) + len(req.tokens) >= self.max_len:
            req.finish = "length"
        if cut >= 0:
            text = text[:cut]
        end = len(text) if req.finish else _safe_end(text, req.stop)
        piece, req.sent = text[req.sent:end], max(req.sent, end)
        if piece or req.finish:
            req.emit(piece, req.finish)

    def _leave(self) -> None:
        """Drop finished and cancelled rows; the last active row moves into each hole."""
        i = 0
        while i < len(self.active):
            req = self.active[i]
            if req.finish is None and not req.cancelled:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                for state in self.states:
                    state.put(i, state, last)
                self.active[i] = self.active[last]
            self.active.pop()


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can go out now: not a tail that may still become a stop
    string, nor an incomplete multi-byte character (decoded as U+FFFD)."""
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


# ============================================================================ HTTP
class Metrics:
    """The Prometheus figures of one server (its own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.waiting = Gauge("llmzoo_requests_waiting", "Requests in the queue", registry=self.registry)
        self.running = Gauge("llmzoo_requests_running", "Sequences in the running batch", registry=self.registry)
        self.tokens = Counter("llmzoo_generated_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("llmzoo_requests", "Requests answered, by status", ["status"], registry=self.registry)
        self.ttft = Histogram("llmzoo_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.tokens_per_s = Gauge("llmzoo_tokens_per_second", "Generated tokens per second over the last 10 s",
                                  registry=self.registry)
        self.generated = 0
        self._window: deque[tuple[float, int]] = deque()

    def count_token(self) -> None:
        self.generated += 1
        self.tokens.inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        now, total = time.monotonic(), self.generated
        self._window.append((now, total))
        while len(self._window) > 1 and now - self._window[0][0] > 10:
            self._window.popleft()
        t0, n0 = self._window[0]
        self.tokens_per_s.set((total - n0) / (now - t0) if now > t0 else 0.0)
        return generate_latest(self.registry)


#: OpenAI request fields llmzoo-serve does not implement, with the values that mean "not
#: asked for": any other value is a 400 naming the field.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,)}


def create_app(engine: Engine, model_name: str) -> Any:
    """The FastAPI application over a started (or, in tests, to-be-started) ``engine``."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
        model: str | None = None
        max_tokens: int = Field(16, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name: wins when given
        temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
        top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
        top_k: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        stream: bool = False
        seed: int | None = Field(None, ge=0, le=MAX_SEED)
        ignore_eos: bool = False  # an extension (as vLLM's): generate max_tokens whatever comes
        stream_options: dict[str, bool] | None = None  # {"include_usage": true}: a last chunk with usage
        n: Literal[1] = 1

        @model_validator(mode="before")
        @classmethod
        def refuse_unsupported(cls, data: Any) -> Any:
            """OpenAI fields this server does not implement: a 400 naming them, never a silent default."""
            if isinstance(data, dict):
                asked = [k for k, default in UNSUPPORTED.items() if k in data and data[k] not in default]
                if asked:
                    raise ValueError(f"not supported by llmzoo-serve: {', '.join(asked)} (leave them out)")
            return data

        @model_validator(mode="after")
        def completion_tokens(self) -> "Sampling":
            if self.max_completion_tokens is not None:
                self.max_tokens = self.max_completion_tokens
            return self

    class Completion(Sampling):
        # text, several texts, token ids, or several lists of token ids (OpenAI's four forms)
        prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)

    class Part(BaseModel):
        type: Literal["text"]  # images and audio: a 400 naming the type
        text: str

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant"]  # developer: the newer name of system
        content: str | list[Part]

        def plain(self) -> dict[str, str]:
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
            return {"role": "system" if self.role == "developer" else self.role, "content": text}

    class Chat(Sampling):
        messages: list[Message] = Field(min_length=1)

    metrics, tok = engine.metrics, engine.tokenizer
    app = FastAPI(title="llmzoo-serve", description=__doc__.split("\n\n")[0])

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        if metrics is not None:
            metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            if e.get("type") in ("json_invalid", "model_attributes_type"):
                parts.append(f"the body must be a JSON object ({e.get('msg')})")
            else:
                parts.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "; ".join(parts))

    def encode(body: Completion | Chat) -> list[list[int]]:
        from llmzoo.api import prompt_ids

        if isinstance(body, Chat):
            render = getattr(tok, "render_chat", None)
            if render is None:
                raise BadRequest("this run's tokenizer has no chat template: use /v1/completions")
            try:
                pieces = render([m.plain() for m in body.messages], generation_prompt=True)
            except ValueError as e:  # the template failed, refused the conversation or ran past its budget
                raise BadRequest(str(e)) from None
            ids = [[tok.bos_id] + [t for text, _ in pieces for t in tok.encode(text)]]
        elif isinstance(body.prompt, str) or isinstance(body.prompt[0], str):
            ids = prompt_ids(tok, [body.prompt] if isinstance(body.prompt, str) else body.prompt)
        else:  # token ids, used as given
            ids = [body.prompt] if isinstance(body.prompt[0], int) else body.prompt
            bad = [t for p in ids for t in p if not 0 <= t < tok.vocab_size]
            if bad or not all(ids):
                raise BadRequest(f"prompt: token ids must lie in [0, {tok.vocab_size}) and lists be non-empty"
                                 + (f" (got {bad[:5]})" if bad else ""))
        for p in ids:
            if len(p) + body.max_tokens > engine.max_len:
                raise BadRequest(f"the prompt has {len(p)} tokens; with max_tokens={body.max_tokens} it needs "
                                 f"{len(p) + body.max_tokens} positions, and this server's context is {engine.max_len}")
        if body.stream and len(ids) > 1:
            raise BadRequest("stream=true takes one prompt")
        return ids

    def new_request(body: Sampling, prompt: list[int], emit) -> Request:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise BadRequest("stop strings must not be empty")
        sampler = Sampler(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
        return Request(prompt=prompt, max_tokens=body.max_tokens, sampler=sampler, emit=emit, stop=stop,
                       ignore_eos=body.ignore_eos)

    async def events(body: Sampling, prompt: list[int]):
        """Submit one request; yield (text, finish_reason) as the engine emits them."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        req = new_request(body, prompt, lambda text, finish: loop.call_soon_threadsafe(inbox.put_nowait, (text, finish)))
        engine.submit(req)
        try:
            while True:
                text, finish = await inbox.get()
                yield req, text, finish
                if finish:
                    return
        finally:
            if req.finish is None:
                engine.cancel(req)

    async def collect(body: Sampling, prompt: list[int], http: HTTPRequest) -> tuple[Request, str, str]:
        """The whole text of one request; cancelled when the client disconnects."""
        parts, gen = [], events(body, prompt)
        watcher = asyncio.create_task(_until_disconnected(http))
        try:
            async for req, text, finish in _racing(gen, watcher):
                parts.append(text)
                if finish:
                    return req, "".join(parts), finish
            raise ClientGone()
        finally:
            watcher.cancel()
            await gen.aclose()

    def usage(reqs: list[Request]) -> dict[str, int]:
        p, c = sum(len(r.prompt) for r in reqs), sum(len(r.tokens) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def answer(body: Completion | Chat, http: HTTPRequest) -> Any:
        chat = isinstance(body, Chat)
        try:
            prompts = encode(body)
        except BadRequest as e:
            return error(400, str(e))
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            gen = events(body, prompts[0])
            try:  # the first event: 429/400 before the stream starts
                first = await gen.__anext__()
            except QueueFull as e:
                await gen.aclose()
                return error(429, str(e), "overloaded")
            except BadRequest as e:
                return error(400, str(e))

            async def sse():
                item = first
                try:
                    while True:
                        _, text, finish = item
                        choice = ({"index": 0, "delta": {"content": text} if text or not finish else {},
                                   "finish_reason": finish} if chat else
                                  {"index": 0, "text": text, "finish_reason": finish})
                        chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                 "model": model_name, "choices": [choice]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if finish:
                            break
                        item = await gen.__anext__()
                    if (body.stream_options or {}).get("include_usage"):
                        chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                 "model": model_name, "choices": [], "usage": usage([item[0]])}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    if metrics is not None:
                        metrics.requests.labels("500" if item[2] == "error" else "200").inc()
                finally:
                    await gen.aclose()  # a client that went away cancels its request here

            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            done = await asyncio.gather(*(collect(body, p, http) for p in prompts))
        except QueueFull as e:
            return error(429, str(e), "overloaded")
        except BadRequest as e:
            return error(400, str(e))
        except ClientGone:
            return Response(status_code=499)
        failed = [text for _, text, finish in done if finish == "error"]
        if failed:  # the engine failed this request (alone: the others in its batch go on)
            return error(500, failed[0].strip(), "server_error")
        choices = [({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    if chat else {"index": i, "text": text, "finish_reason": finish})
                   for i, (_, text, finish) in enumerate(done)]
        if metrics is not None:
            metrics.requests.labels("200").inc()
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices,
                "usage": usage([r for r, _, _ in done])}

    @app.post("/v1/completions")
    async def completions(body: Completion, http: HTTPRequest):
        return await answer(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: Chat, http: HTTPRequest):
        return await answer(body, http)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llmzoo",
                                            "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.active), "waiting": len(engine.queue)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render() if metrics is not None else b"", media_type="text/plain; version=0.0.4")

    return app


class BadRequest(ValueError):
    """A request the server cannot take (HTTP 400 with this message)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _until_disconnected(http: Any) -> None:
    """Returns when the client disconnects: after the body was read, the server's next
    ASGI message for this request is ``http.disconnect`` (no polling, which would take the
    interpreter from the engine thread)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _racing(gen, watcher: asyncio.Task):
    """Items of the async generator ``gen`` until ``watcher`` (a disconnect) finishes first."""
    while True:
        nxt = asyncio.ensure_future(gen.__anext__())
        done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


# ============================================================================ CLI
def _serve_rules() -> dict[str, Any]:
    from llmzoo.config import Rule

    return {"port": Rule(int, 0, 65535), "max_batch": Rule(int, 1), "max_queue": Rule(int, 0),
            "prefill_batch": Rule(int, 1), "max_len": Rule(int, 1, nullable=True)}


SERVE_RULES = _serve_rules()
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(cfg: Any) -> None:
    import uvicorn

    from llmzoo.api import load_run
    from llmzoo.config import check_device, check_settings
    from llmzoo.errors import UserError

    if cfg.run_dir is None:
        raise UserError("give run_dir=<folder of a training run>")
    check_settings(cfg, SERVE_RULES, {"batching": BATCHING, "log_level": LOG_LEVELS})  # before the run loads
    if not isinstance(cfg.host, str) or not cfg.host:
        raise UserError(f"host={cfg.host!r}: an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    device = check_device(cfg.device)
    run = load_run(cfg.run_dir, cfg.checkpoint)
    try:
        engine = Engine(run.model.to(device), run.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                        max_len=cfg.max_len, batching=cfg.batching, metrics=Metrics(),
                        prefill_batch=cfg.prefill_batch)
    except ValueError as e:
        raise UserError(str(e)) from None
    from pathlib import Path

    name = cfg.model_name or Path(str(cfg.run_dir)).resolve().name
    app = create_app(engine, name)
    engine.start()
    log.info("serving %s on http://%s:%d (max_batch %d, %s batching)", name, cfg.host, cfg.port, cfg.max_batch,
             cfg.batching)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        engine.shutdown()


def main() -> None:
    """llmzoo-serve run_dir=<run> [host=...] [port=...] (``--help``)."""
    import hydra
    from omegaconf import DictConfig

    from llmzoo.cli import hydra_entry

    @hydra.main(config_path="pkg://llmzoo_conf", config_name="serve", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from llmzoo.errors import reported

        with reported("llmzoo-serve"):
            serve(cfg)

    hydra_entry("llmzoo-serve", app)
