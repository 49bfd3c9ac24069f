"""llmzoo-serve: many concurrent clients get exactly what greedy decoding of each prompt
alone gives (dense, MoE, Mamba-2, hybrid), streaming and chat, a client that leaves frees
its row, overload is a 429, bad requests are a 400, a few hundred requests lose none."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import llmzoo  # noqa: E402
from conftest import FAST, run_cli  # noqa: E402
from llmzoo.api import Run, generate_ids, prompt_ids  # noqa: E402
from llmzoo_plugins.sampling import Greedy  # noqa: E402
from llmzoo_plugins.serve import Engine, Metrics, create_app  # noqa: E402

PROMPTS = ["Once upon a time", "The owl", "A", "In the morning the fox went to the river and",
           "12 + 7 =", "gene: TATAAT", "She said", "x" * 30]


def make_run(block: str, seed: int = 0, model: str = "tiny") -> Run:
    cfg = llmzoo.compose(overrides=[f"model={model}", f"block={block}"])
    torch.manual_seed(seed)
    tokenizer = llmzoo.build_tokenizer(cfg)
    return Run(llmzoo.build_model(cfg, vocab_size=tokenizer.vocab_size).eval(), tokenizer, cfg)


def alone(run: Run, prompt: str, max_tokens: int) -> str:
    """What llmzoo-generate gives this prompt on its own (greedy), as text without eos."""
    out = generate_ids(run, Greedy(), prompt_ids(run.tokenizer, [prompt]), max_new_tokens=max_tokens)[0]
    if out and out[-1] == run.tokenizer.eos_id:
        out = out[:-1]
    return run.tokenizer.decode(out)


class Server:
    """An llmzoo-serve app on a free local port, in a thread."""

    def __init__(self, run: Run, **engine_kw):
        self.engine = Engine(run.model, run.tokenizer, metrics=Metrics(), **engine_kw)
        app = create_app(self.engine, "tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


async def complete_all(url: str, bodies: list[dict], path: str = "/v1/completions", limit: int = 64):
    """POST every body, ``limit`` at a time; the responses in order. (The semaphore keeps
    requests out of httpx's pool queue, whose bookkeeping grows with its square and would
    take the interpreter from the server's threads in this process.)"""
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    gate = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def post(body):
            async with gate:
                return await client.post(path, json=body)

        return await asyncio.gather(*(post(b) for b in bodies))


@pytest.mark.parametrize("block", ["dense", "moe", "mamba2", "hybrid"])
def test_concurrent_clients_get_what_each_prompt_gives_alone(block):
    run = make_run(block)
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), "max_tokens": 4 + (7 * i) % 23,
               "temperature": 0} for i in range(48)]
    with Server(run, max_batch=32) as srv:
        responses = asyncio.run(complete_all(srv.url, bodies))
        peak = srv.engine.peak_batch
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == alone(run, body["prompt"], body["max_tokens"]), body
        assert choice["finish_reason"] in ("stop", "length")
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(prompt_ids(run.tokenizer, [body["prompt"]])[0])
    assert peak >= 16, f"requests were not batched together (at most {peak} rows at once)"


def test_streaming_chat_models_health_and_metrics():
    run = make_run("dense")
    with Server(run, max_batch=4) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        pieces, finish = [], None
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
        assert "".join(pieces) == whole and finish in ("stop", "length") and len(pieces) > 3
        # chat: the tokenizer's template, as llmzoo-generate chat=true renders one user turn
        msg = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 12, "temperature": 0}
        got = client.post("/v1/chat/completions", json=msg).json()["choices"][0]["message"]
        ids = prompt_ids(run.tokenizer, ["Say hi."], chat=True)
        out = generate_ids(run, Greedy(), ids, max_new_tokens=12)[0]
        assert got == {"role": "assistant", "content": run.tokenizer.decode([t for t in out if t != run.tokenizer.eos_id])}
        # seeded sampling repeats; stop strings end the text before them
        sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 5}
        a, b = (client.post("/v1/completions", json=sampled).json()["choices"][0]["text"] for _ in range(2))
        assert a == b
        stop = whole[5:7]
        cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert cut == {"index": 0, "text": whole[:whole.index(stop)], "finish_reason": "stop"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics").text
        assert "llmzoo_time_to_first_token_seconds_count" in metrics and "llmzoo_requests_waiting" in metrics
        generated = [line for line in metrics.splitlines() if line.startswith("llmzoo_generated_tokens_total")]
        assert float(generated[0].split()[-1]) >= 20


def test_a_client_that_leaves_frees_its_row_and_overload_is_429():
    run = make_run("dense", model="small")  # ~10 ms a step here: 200 steps outlast the test's requests
    with Server(run, max_batch=2, max_queue=0) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        long = {"prompt": "Once", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        streams = [client.stream("POST", "/v1/completions", json={**long, "stream": True}) for _ in range(2)]
        readers = []  # kept: dropping a line iterator closes its response (a disconnect)
        for s in streams:  # both rows busy
            r = s.__enter__()
            assert r.status_code == 200
            readers.append(r.iter_lines())
            next(readers[-1])
        assert len(srv.engine.active) == 2
        busy = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert busy.status_code == 429 and "full" in busy.json()["error"]["message"]
        for s in streams:  # the clients leave mid-stream
            s.__exit__(None, None, None)
        deadline = time.time() + 10
        while srv.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert not srv.engine.active, "a disconnected client kept its row"
        assert srv.engine.metrics.generated < 2 * 200, "the requests ran to the end: nothing was cancelled"
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


BAD = [
    ("not json", "the body must be a JSON object"),
    ('{"prompt": ', "the body must be a JSON object (JSON decode error)"),
    ({"max_tokens": 4}, "prompt: Field required"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "n": 2}, "n: Input should be 1"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "a" * 100, "max_tokens": 100}, "this server's context is 128"),
    ({"prompt": ["a", "b"], "stream": True}, "stream=true takes one prompt"),
    ({"prompt": "a", "stop": [""]}, "stop strings must not be empty"),
    ({"prompt": "a", "logprobs": 2}, "not supported by llmzoo-serve: logprobs"),
    ({"prompt": "a", "echo": True, "frequency_penalty": 0.5}, "not supported by llmzoo-serve: echo, frequency_penalty"),
    ({"prompt": [1, 2, 10**6]}, "token ids must lie in [0, 259)"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_400_with_the_reason(body, message, bad_request_server):
    client = bad_request_server
    if isinstance(body, str):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_bad_chat_request_is_400(bad_request_server):
    r = bad_request_server.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_openai_fields_are_honoured_not_ignored(bad_request_server):
    """max_completion_tokens, the developer role, content as parts and token-id prompts
    do what the OpenAI API says; content parts other than text are a 400 naming the type."""
    client = bad_request_server
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    plain = client.post("/v1/chat/completions", json={**chat, "max_tokens": 5}).json()
    newer = client.post("/v1/chat/completions", json={
        **chat, "max_completion_tokens": 5,
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]})
    assert newer.status_code == 200, newer.text
    newer = newer.json()
    assert newer["usage"]["completion_tokens"] == 5  # not max_tokens=16
    assert newer["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    image = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert image.status_code == 400 and "messages.0.content" in image.json()["error"]["message"]
    text = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 6, "ignore_eos": True,
                                                 "temperature": 0}).json()
    from llmzoo.api import prompt_ids
    from llmzoo_plugins.tokenizers import ByteTokenizer  # the test runs' tokenizer

    ids = prompt_ids(ByteTokenizer(), ["Once upon"])[0]  # token ids are used as given
    tokens = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "ignore_eos": True,
                                                   "temperature": 0}).json()
    assert tokens["choices"][0]["text"] == text["choices"][0]["text"]


@pytest.fixture(scope="module")
def bad_request_server():
    with Server(make_run("dense"), max_batch=2) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client


def test_a_few_hundred_requests_lose_none():
    run = make_run("dense")
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1 + i % 9, "temperature": 0} for i in range(300)]
    with Server(run, max_batch=32, max_queue=512) as srv:
        responses = asyncio.run(complete_all(srv.url, bodies, limit=100))
        assert not srv.engine.active and not srv.engine.queue
    want = {(b["prompt"], b["max_tokens"]): alone(run, b["prompt"], b["max_tokens"]) for b in bodies}
    assert [r.status_code for r in responses] == [200] * 300
    assert [r.json()["choices"][0]["text"] for r in responses] == [want[b["prompt"], b["max_tokens"]] for b in bodies]


def test_static_batching_gives_the_same_answers():
    run = make_run("mamba2")
    bodies = [{"prompt": p, "max_tokens": 3 + i, "temperature": 0} for i, p in enumerate(PROMPTS)]
    with Server(run, max_batch=3, batching="static") as srv:
        responses = asyncio.run(complete_all(srv.url, bodies))
    assert [r.json()["choices"][0]["text"] for r in responses] == [alone(run, b["prompt"], b["max_tokens"]) for b in bodies]


def test_cli_help_and_errors(tmp_path):
    out = run_cli("llmzoo-serve", "--help")
    assert "/v1/chat/completions" in out.stdout and "max_batch" in out.stdout
    from llmzoo.errors import UserError
    from llmzoo_plugins.serve import serve

    with pytest.raises(UserError, match="give run_dir="):  # what the command prints, exit 2
        serve(llmzoo.compose("serve", [], validate=False))

    cfg = llmzoo.compose("serve", [f"run_dir={tmp_path / 'nowhere'}"], validate=False)
    with pytest.raises(UserError, match="does not exist"):
        serve(cfg)


def test_a_block_without_row_state_is_refused_with_the_reason():
    import types

    with pytest.raises(ValueError, match="needs blocks whose decode state has independent rows .* \\['Identity'\\]"):
        Engine(types.SimpleNamespace(blocks=[torch.nn.Identity()]), None)


def test_the_command_serves_a_trained_run(pretrained):
    """llmzoo-serve as a user starts it: a trained run, a real port, then Ctrl-C."""
    import os
    import signal
    import subprocess

    from conftest import BIN

    run_dir = pretrained("dense", 300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "llmzoo-serve"), f"run_dir={run_dir}", f"port={port}", "max_batch=8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        run = llmzoo.load_run(run_dir)
        assert got["choices"][0]["text"] == alone(run, body["prompt"], 30)
        assert got["model"] == run_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.parametrize("block", ["moe", "mamba2"])
def test_engine_alone_finishes_each_request_once(block):
    """The engine without HTTP: 24 requests through 8 rows, some ending at their first token
    (eos): each gets greedy's tokens and exactly one last emit, and no row is decoded after
    its request ended."""
    from types import SimpleNamespace

    from llmzoo.shared.decoding import Sampler
    from llmzoo_plugins.serve import Request

    cfg = llmzoo.compose(overrides=["model=tiny", f"block={block}", "model.vocab_size=64"])
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg).eval()
    tok = SimpleNamespace(eos_id=63, decode=lambda ids: ",".join(map(str, ids)))
    prompts = [[1 + (i * 7) % 50 + j for j in range(1 + i % 9)] for i in range(24)]
    lengths = [3 + (5 * i) % 17 for i in range(24)]
    engine, text, ends = Engine(model, tok, max_batch=8, max_queue=64), {}, {}

    def emit(i, piece, finish):
        assert i not in ends, f"request {i} emitted after it ended"
        text[i] = text.get(i, "") + piece
        if finish:
            ends[i] = finish

    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.submit(Request(prompt=p, max_tokens=n, sampler=Sampler(), emit=lambda t, f, i=i: emit(i, t, f)))
    while engine.queue or engine.active:
        engine.step()
    # prompts waiting together are prefilled together: padded where the states rewind,
    # equal lengths only for recurrent states
    if engine.rewindable:
        assert engine.prefills <= 1 + 16  # the first 8 in one forward, the other 16 at most one each
    else:
        before = engine.prefills
        for _ in range(4):
            engine.submit(Request(prompt=[5, 6, 7], max_tokens=2, sampler=Sampler(), emit=lambda t, f: None))
        while engine.queue or engine.active:
            engine.step()
        assert engine.prefills == before + 1
    first_token_eos = 0
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = Greedy().generate(model, [p], max_new_tokens=n, eos_id=63)[0]
        first_token_eos += want == [63]
        assert text[i] == tok.decode([t for t in want if t != 63]) and ends[i] == ("stop" if want[-1] == 63 else "length")
    assert engine.peak_batch == 8
    if block == "moe":
        assert first_token_eos > 0  # the case of a request that ends at its prefill is covered


# ----------------------------------------------------------------------------- hostile requests fail alone
# Passes the import check on one message, loops ~1e10 times on two: what a crafted
# tokenizer_config.json can carry.
BOMB = ("{% for m in messages %}{% if loop.index > 1 %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_hostile_request_fails_alone_while_good_ones_get_greedy(tmp_path):
    from llmzoo_plugins.tokenizers import BPETokenizer, ChatTemplateError, JsonTokenizer

    bpe = BPETokenizer(vocab_size=300)
    bpe.fit([" ".join(PROMPTS)] * 20)
    bpe.save(tmp_path / "tok")
    tok = JsonTokenizer(tmp_path / "tok", chat_template=BOMB)  # the check at load passes: one message is fine
    cfg = llmzoo.compose(overrides=["model=tiny", "block=dense", f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    run = Run(llmzoo.build_model(cfg).eval(), tok, cfg)
    good = [{"prompt": p, "max_tokens": 6, "temperature": 0} for p in PROMPTS]
    hostile = [("/v1/completions", {"prompt": "a", "seed": 2**64}, 400, "seed"),
               ("/v1/completions", {"prompt": "a", "temperature": 1e300}, 400, "temperature"),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 2}, 400, "budget")]

    async def together(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in good),
                                           *(client.post(path, json=b) for path, b, _, _ in hostile),
                                           client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5,
                                                                                 "temperature": 1e-40}))
            health = await client.get("/health", timeout=2)
            return replies, health, time.perf_counter() - t0

    with Server(run, max_batch=16) as srv:
        replies, health, took = asyncio.run(together(srv.url))
        metrics = httpx.get(srv.url + "/metrics").text
    assert health.status_code == 200
    for body, r in zip(good, replies):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone(run, body["prompt"], 6), r.text
    for (_, _, status, word), r in zip(hostile, replies[len(good):]):
        assert r.status_code == status and word in r.json()["error"]["message"], r.text
    tiny_t = replies[-1]  # a temperature of 1e-40 is a draw from a one-hot: greedy's tokens
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == alone(run, "a", 5)
    assert took < 30
    assert 'llmzoo_requests_total{status="400"} 3.0' in metrics
    # the bomb is cut off at its budget, and the error is one message
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="budget"):
        tok.render_chat([{"role": "user", "content": "a"}] * 2)
    assert time.perf_counter() - t0 < 1.5


def test_engine_fails_only_the_request_whose_sampler_fails():
    from llmzoo.shared.decoding import Sampler
    from llmzoo_plugins.serve import Request

    class Broken(Sampler):
        def __call__(self, logits):
            raise RuntimeError("probability tensor contains inf")

    cfg = llmzoo.compose(overrides=["model=tiny", "block=dense", "model.vocab_size=64"])
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg).eval()
    from types import SimpleNamespace

    tok = SimpleNamespace(eos_id=63, decode=lambda ids: ",".join(map(str, ids)))
    engine, out = Engine(model, tok, max_batch=8), {}
    for i in range(8):
        sampler = Broken(temperature=1.0) if i == 3 else Sampler()
        engine.submit(Request(prompt=[1 + i, 2, 3], max_tokens=5, sampler=sampler,
                              emit=lambda t, f, i=i: out.setdefault(i, []).append((t, f))))
    while engine.queue or engine.active:
        engine.step()
    assert out[3][-1][1] == "error" and "sampling failed" in out[3][-1][0]
    for i in set(range(8)) - {3}:
        want = Greedy().generate(model, [[1 + i, 2, 3]], max_new_tokens=5, eos_id=63)[0]
        assert "".join(t for t, _ in out[i]) == tok.decode([t for t in want if t != 63]) and out[i][-1][1] != "error"
