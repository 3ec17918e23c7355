"""Data pipeline and training-loop benchmarks (issue: data pipeline and one training loop).

Side by side in one run, on this machine:
  1. SFT effective (non-padding) training tokens/s: packed rows vs MiniMind-style pad-to-max-length,
     on conversations whose lengths follow a MiniMind-like long-tailed distribution (target >= 2x).
  2. `prepare` throughput in MB/s with 1 and 2 workers, against tokenizing inside the training loop.
  3. 2-process DDP (gloo, CPU) vs 1 process: tokens/s and scaling efficiency.

  python benchmarks/bench_training.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nanomind.model import NanoMind, preset_config
from nanomind.prepare import ConversationEncoder, PrepareOptions, prepare
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent


def sft_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Long-tailed conversation lengths (median ~180 tokens, some at the cap), like MiniMind's SFT data
    at max_seq_len 768."""
    rng = np.random.default_rng(seed)
    return [int(min(max(16, x), max_len)) for x in rng.lognormal(mean=np.log(180), sigma=0.8, size=n)]


def step_time(model, batch: torch.Tensor, optimizer, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = model(batch[:, :-1], targets=batch[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def bench_packing(quick: bool) -> dict:
    seq_len, batch = 768, 4
    lengths = sft_lengths(400 if quick else 2000, seq_len)
    # Padded: one conversation per row. Packed: first fit in arrival order, as prepare.RowPacker does.
    packed_rows, current = 0, 0
    for n in lengths:
        if current + n > seq_len:
            packed_rows, current = packed_rows + 1, 0
        current += n
    packed_rows += 1
    real_tokens = sum(lengths)
    model = NanoMind(preset_config("tiny"), verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = step_time(model, torch.randint(3, 6400, (batch, seq_len + 1)), optimizer, 2 if quick else 4)
    padded_tps = real_tokens / (len(lengths) / batch * t)
    packed_tps = real_tokens / (packed_rows / batch * t)
    return {"conversations": len(lengths), "real_tokens": real_tokens, "padded_rows": len(lengths),
            "packed_rows": packed_rows, "padded_effective_tok_s": padded_tps, "packed_effective_tok_s": packed_tps,
            "speedup": packed_tps / padded_tps, "step_s": t}


def prepare_seconds(sft: Path, tokenizer: Path, out: Path, workers: int) -> float:
    """`prepare` timed in a fresh process whose main module is as light as `nanomind prepare`'s: each
    spawned worker re-imports the main module, and this script's imports (torch, the model) would
    cost every worker seconds that the command does not."""
    code = ("import sys, time\n"
            "from nanomind.prepare import PrepareOptions, prepare\n"
            "start = time.perf_counter()\n"
            "prepare([sys.argv[1]], sys.argv[2], sys.argv[3], PrepareOptions(kind='sft', seq_len=768),\n"
            "        workers=int(sys.argv[4]), verbose=False)\n"
            "print(time.perf_counter() - start)\n")
    result = subprocess.run([sys.executable, "-c", code, str(sft), str(tokenizer), str(out), str(workers)],
                            check=True, capture_output=True, text=True)
    return float(result.stdout)


def bench_prepare(workdir: Path, quick: bool) -> dict:
    synthesize(workdir / "data", size="tiny" if quick else "small")
    sft = workdir / "data" / "sft.jsonl"
    tokenizer = train_tokenizer([sft], vocab_size=2048, out_dir=workdir / "tok")
    megabytes = sft.stat().st_size / 1e6
    results = {"file_mb": megabytes}
    for workers in (1, 2):
        seconds = prepare_seconds(sft, workdir / "tok", workdir / f"prep{workers}", workers)
        results[f"prepare_{workers}_workers_mb_s"] = megabytes / seconds
    # Tokenizing inside the loop, as MiniMind's dataset does on every access: template + encode per sample.
    encoder = ConversationEncoder(tokenizer, PrepareOptions(kind="sft", seq_len=768))
    conversations = [json.loads(line)["conversations"] for line in open(sft, encoding="utf-8")]
    start = time.perf_counter()
    for conversation in conversations:
        encoder.encode(conversation)
    results["in_loop_mb_s_per_epoch"] = megabytes / (time.perf_counter() - start)
    return results


def bench_ddp(workdir: Path, quick: bool) -> dict:
    synthesize(workdir / "ddp", size="tiny")
    train_tokenizer([workdir / "ddp" / "pretrain.jsonl"], vocab_size=1024, out_dir=workdir / "ddptok")
    prepare([workdir / "ddp" / "pretrain.jsonl"], workdir / "ddptok", workdir / "ddpdata",
            PrepareOptions(kind="pretrain", seq_len=256), verbose=False)
    steps = 6 if quick else 12
    common = ["pretrain", "--data", str(workdir / "ddpdata"), "--tokenizer", str(workdir / "ddptok"),
              "--preset", "tiny", "--max-steps", str(steps), "--eval-every", "0", "--lr", "1e-3"]
    results = {}
    for procs in (1, 2):
        out = workdir / f"ddp{procs}"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // procs))}
        launcher = ([sys.executable, "-m", "nanomind"] if procs == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "nanomind"])
        # The same global batch: 16 rows per step, split over the processes.
        subprocess.run([*launcher, *common, "--batch-size", str(16 // procs), "--out", str(out)],
                       check=True, capture_output=True, env=env)
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]  # skip the warm-up step
        results[f"{procs}_process_tok_s"] = float(np.median([m["tokens_per_s"] for m in metrics]))
    results["scaling_efficiency"] = results["2_process_tok_s"] / (2 * results["1_process_tok_s"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--write", action="store_true", help="update the section in benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        packing = bench_packing(args.quick)
        prep = bench_prepare(Path(tmp), args.quick)
        ddp = bench_ddp(Path(tmp), args.quick)
    command = "python benchmarks/bench_training.py" + (" --quick" if args.quick else "")
    table = "\n".join([
        "## Data pipeline and training loop",
        "",
        f"Command: `{command}` ({os.cpu_count()} CPU cores, torch {torch.__version__}, fp32, `tiny` preset).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| SFT effective tokens/s, packed vs padded to 768 ({packing['conversations']} conversations, "
        f"median ~180 tokens) | {packing['packed_effective_tok_s']:,.0f} vs {packing['padded_effective_tok_s']:,.0f} "
        f"tok/s: **{packing['speedup']:.2f}x** ({packing['packed_rows']} vs {packing['padded_rows']} rows) | >= 2x |",
        f"| `prepare` throughput, SFT ({prep['file_mb']:.1f} MB) | 1 worker {prep['prepare_1_workers_mb_s']:.2f} MB/s, "
        f"2 workers {prep['prepare_2_workers_mb_s']:.2f} MB/s | once, instead of every epoch |",
        f"| tokenizing inside the loop (template + encode per sample) | {prep['in_loop_mb_s_per_epoch']:.2f} MB/s, "
        f"paid again every epoch | |",
        f"| DDP on CPU (gloo), same global batch | 1 process {ddp['1_process_tok_s']:,.0f} tok/s, 2 processes "
        f"{ddp['2_process_tok_s']:,.0f} tok/s: efficiency **{ddp['scaling_efficiency']:.0%}** | |",
        "",
    ])
    print(table)
    if args.write:
        path = ROOT / "RESULTS.md"
        text = path.read_text() if path.exists() else "# Benchmark results\n\n"
        start = text.find("## Data pipeline and training loop")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + table + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        path.write_text(text)


if __name__ == "__main__":
    main()
