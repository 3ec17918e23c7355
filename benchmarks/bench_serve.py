"""Serving throughput: continuous batching against one request at a time, same model, same machine.

Starts `nanomind serve` twice on the same checkpoint (a random-weights model of --preset with a
tokenizer trained on the built-in text): once as shipped (--max-batch 16) and once with
--max-batch 1, which decodes one request at a time and queues the rest. The two servers run one
after the other, never together. At 1, 4, 8 and 16 concurrent streaming clients (each sends
--requests requests back to back, every reply exactly --max-tokens tokens thanks to `ignore_eos`)
it reports aggregate completion tokens/s over the wave and time to first token p50 / p95 (from
sending the request to the first content chunk, queueing included).

    python benchmarks/bench_serve.py                      # preset small, 64 tokens per reply
    python benchmarks/bench_serve.py --quick              # smoke run: preset tiny, 16 tokens
    python benchmarks/bench_serve.py --write              # also replace the Serving section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from nanomind.builtin_text import builtin_documents, write_builtin_jsonl
from nanomind.checkpoint import save_checkpoint
from nanomind.model import NanoMind, preset_config
from nanomind.tokenizer import train_tokenizer

RESULTS = Path(__file__).with_name("RESULTS.md")
LEVELS = (1, 4, 8, 16)


def make_checkpoint(root: Path, preset: str) -> Path:
    tokenizer = train_tokenizer([write_builtin_jsonl(root / "text.jsonl", 3000)], vocab_size=2048)
    torch.manual_seed(0)
    model = NanoMind(preset_config(preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=4096))
    return save_checkpoint(model, root / "model", tokenizer=tokenizer)


def start_server(model_dir: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "nanomind.cli", "serve", "--model", str(model_dir),
                                "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch),
                                "--max-queue", "256"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start: {process.stderr.read()}")


def one_stream(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


def wave(url: str, clients: int, requests: int, max_tokens: int, prompts: list[str]) -> dict:
    ttfts, tokens = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(requests):
            ttft, n = one_stream(url, prompts[(i * requests + r) % len(prompts)], max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"tokens_per_s": sum(tokens) / elapsed, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], "tokens": sum(tokens)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (random weights)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per server")
    parser.add_argument("--quick", action="store_true", help="smoke run: preset tiny, 16 tokens, 1 request")
    parser.add_argument("--write", action="store_true", help="replace the '## Serving' section of RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.max_tokens, args.requests = "tiny", 16, 1
    prompts = [d[:200] for d in builtin_documents(64, seed=1)]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp), args.preset)
        for name, max_batch in (("batched", 16), ("one at a time", 1)):
            process, url = start_server(model_dir, max_batch, args.threads)
            try:
                wave(url, 2, 1, 4, prompts)  # warm-up
                for clients in LEVELS:
                    results[name, clients] = r = wave(url, clients, args.requests, args.max_tokens, prompts)
                    print(f"{name:14} {clients:2} streams: {r['tokens_per_s']:7.1f} tokens/s, "
                          f"TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms p95 {r['ttft_p95'] * 1000:6.0f} ms", flush=True)
            finally:
                process.terminate()
                process.wait(timeout=30)

    command = "python benchmarks/bench_serve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Serving",
        "",
        f"`{command.strip()}` — `nanomind serve` with continuous batching (--max-batch 16) against the same "
        f"server decoding one request at a time (--max-batch 1); preset `{args.preset}` (random weights, "
        f"fp32), {args.max_tokens} tokens per streamed reply, {args.requests} requests per client, "
        f"{args.threads} torch threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
        "TTFT counts queueing.",
        "",
        "| streams | batched tokens/s | one-at-a-time tokens/s | speed-up | batched TTFT p50 / p95 (ms) "
        "| one-at-a-time TTFT p50 / p95 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for clients in LEVELS:
        b, s = results["batched", clients], results["one at a time", clients]
        lines.append(f"| {clients} | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
                     f"{b['tokens_per_s'] / s['tokens_per_s']:.2f}x | {b['ttft_p50'] * 1000:.0f} / "
                     f"{b['ttft_p95'] * 1000:.0f} | {s['ttft_p50'] * 1000:.0f} / {s['ttft_p95'] * 1000:.0f} |")
    speedup = results["batched", 8]["tokens_per_s"] / results["one at a time", 8]["tokens_per_s"]
    lines += ["", f"Target: >= 3x aggregate tokens/s at 8 streams; measured {speedup:.2f}x.", ""]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
        start = text.find("## Serving")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + table + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        RESULTS.write_text(text, encoding="utf-8")
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
