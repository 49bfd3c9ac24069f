"""Server throughput and time to first token: ``llmzoo-serve`` with continuous batching,
the same server with static batching, and ``transformers serve`` on the exported model
(same weights, same machine, one run), at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_bench.py                       # model=small, CPU
    python benchmarks/serve_bench.py --model tiny --requests-per-client 2 --max-tokens 16   # a quick look

Each client streams its requests one after the other (``/v1/completions``, ``stream``,
temperature 0, between 0.25x and 1.75x ``--max-tokens`` each, the same lengths for every
server); time to first token is measured at the first
server-sent event with text, throughput as completion tokens / wall time of the whole
load. The load generator runs in its own process, so the servers' threads do not share
an interpreter with it. One JSON record per (server, concurrency) goes to
``benchmarks/results/serve.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import serve_rows  # benchmarks/report.py (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = ["Once upon a time", "The owl and the fox", "In the morning the fox went to the river and",
           "12 + 7 =", "gene: TATAAT", "She said that the", "A long time ago in a small village, there",
           "Why is the sky"]


# ----------------------------------------------------------------------------- the load generator
async def load(url: str, model: str, clients: int, per_client: int, max_tokens: int, extra: dict) -> dict:
    import httpx

    ttft, tokens, failed = [], 0, 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, failed
        for j in range(per_client):
            # lengths vary (0.25x to 1.75x max_tokens, the same sequence for every server), as real
            # requests do; that is when joining between steps matters
            n = max(4, int(max_tokens * (0.25 + 0.15 * ((7 * i + 3 * j) % 11))))
            body = {"model": model, "prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": n,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
            t0, first, text, chunks = time.perf_counter(), None, "", 0
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    failed += 1
                    await r.aread()
                    continue
                usage = None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                    if piece and first is None:
                        first = time.perf_counter() - t0
                    chunks += bool(piece)
                    text += piece
                    usage = chunk.get("usage") or usage
            ttft.append(first if first is not None else time.perf_counter() - t0)
            tokens += usage["completion_tokens"] if usage else chunks  # (a server without usage: a chunk a token)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    if not ttft:
        raise RuntimeError(f"every request failed ({failed})")
    q = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else ttft * 99
    return {"clients": clients, "requests": clients * per_client, "failed": failed, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1), "ttft_p99_ms": round(q[98] * 1000, 1)}


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start in 300 s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_load(url: str, model: str, clients: int, args, extra: dict) -> dict:
    """The load generator in a fresh process (see the module docstring)."""
    cmd = [sys.executable, __file__, "--client", url, "--served-model", model, "--clients", str(clients),
           "--requests-per-client", str(args.requests_per_client), "--max-tokens", str(args.max_tokens),
           "--extra", json.dumps(extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model= preset of the served run (default small)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--servers", default="llmzoo-continuous,llmzoo-static,transformers",
                   help="which of llmzoo-continuous, llmzoo-static, transformers")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.jsonl"))
    p.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the load generator against this URL
    p.add_argument("--served-model", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(load(args.client, args.served_model, int(args.clients), args.requests_per_client,
                                          args.max_tokens, json.loads(args.extra)))))
        return

    import torch

    import llmzoo
    from llmzoo.shared.flops import device_description
    from llmzoo_plugins.hf_io import export_hf

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    run_dir, hf_dir = work / "run", work / "hf"
    subprocess.run([str(BIN / "llmzoo-train"), f"model={args.model}", f"run_dir={run_dir}", "trainer.max_steps=20",
                    "trainer.val_every=0", "logger=[]", "sample.prompts=[]", "trainer.enable_progress_bar=false"],
                   check=True, capture_output=True)
    export_hf(llmzoo.load_run(run_dir), hf_dir)
    max_clients = max(int(c) for c in args.clients.split(","))
    servers = {
        "llmzoo-continuous": ([str(BIN / "llmzoo-serve"), f"run_dir={run_dir}", f"max_batch={max_clients}",
                               "log_level=warning"], "run", {"ignore_eos": True}),
        "llmzoo-static": ([str(BIN / "llmzoo-serve"), f"run_dir={run_dir}", f"max_batch={max_clients}",
                           "batching=static", "log_level=warning"], "run", {"ignore_eos": True}),
        # transformers serve refuses unknown fields (ignore_eos); the briefly trained model rarely stops
        "transformers": ([str(BIN / "transformers"), "serve", str(hf_dir), "--continuous-batching"], str(hf_dir), {}),
    }
    records = []
    for name in args.servers.split(","):
        cmd, model, extra = servers[name]
        port = free_port()
        cmd = cmd + ([f"port={port}"] if name.startswith("llmzoo") else ["--port", str(port)])
        try:
            proc = start(cmd, port, work / f"{name}.log")
        except RuntimeError as e:
            print(f"{name}: not measured: {e}", file=sys.stderr)
            records.append({"server": name, "error": str(e)[-500:]})
            continue
        try:
            url = f"http://127.0.0.1:{port}"
            run_load(url, model, 2, argparse.Namespace(requests_per_client=1, max_tokens=8), extra)  # warm up
            for clients in (int(c) for c in args.clients.split(",")):
                try:
                    rec = {"server": name, **run_load(url, model, clients, args, extra)}
                except subprocess.CalledProcessError as e:
                    rec = {"server": name, "clients": clients, "error": e.stderr[-500:]}
                print(json.dumps(rec), flush=True)
                records.append(rec)
        finally:
            stop(proc)
    meta = {"benchmark": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model, "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client, "device": device_description(),
            "torch": torch.__version__}
    with open(args.out, "a") as fh:
        for rec in records:
            fh.write(json.dumps({**meta, **rec}) + "\n")
    print(serve_rows([{**meta, **rec} for rec in records]))  # the table benchmarks/README.md shows


if __name__ == "__main__":
    main()
