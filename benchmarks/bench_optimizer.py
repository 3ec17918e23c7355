"""AdamW against Muon, and Muon with LayerDrop, for the demo's pretraining, side by side on this machine.

  1. Step time of the demo's `tiny` model (batch 4 x 256 tokens) with fused AdamW, with torch.optim.Muon
     (Newton-Schulz in bf16) and with nanomind's CpuMuon (the same in fp32), for the blocks' matrices.
  2. The demo's first pretraining stage, time-boxed, with AdamW, with Muon, and as the demo runs it
     (Muon, and a quarter of the steps without layers 1 and 2): steps taken, held-out loss, how often
     the model gets right the one-step sums that worked solutions chain (47 + 30, 77 + 8, 30 x 7, 7 x 8,
     210 + 56) on held-out problems, greedy, and the held-out loss of its first and last layers alone
     (`convert --keep-layers 0,3`: how the demo makes its distillation student).

  python benchmarks/bench_optimizer.py [--seconds 225] [--quick] [--write]

To play a slower machine, run it as OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_optimizer.py (one core, AVX2 kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_core import RESULTS_PATH, outcome_table, publish_section
from nanomind.checkpoint import load_model
from nanomind.demo import SIZES, dropped_layers, pretrain_flags, run_command
from nanomind.evaluation import held_out_loss
from nanomind.generation import SamplingParams, generate
from nanomind.model import NanoMind, preset_config
from nanomind.synth import draw_problem, worked_steps
from nanomind.tokenizer import Tokenizer
from nanomind.trainer import build_optimizer

# The settings that play a slower machine, shown in the command when they were given.
MACHINE_SETTINGS = ["OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"]
COMMAND = " ".join([f"{k}={os.environ[k]}" for k in MACHINE_SETTINGS if k in os.environ] + ["python", *sys.argv])


def step_seconds(optimizer_kind: str, vocab_size: int, steps: int) -> float:
    """Median seconds of a forward, backward and optimizer step of the demo's model."""
    torch.manual_seed(0)
    model = NanoMind(preset_config("tiny", vocab_size=vocab_size), verbose=False)
    optimizer = build_optimizer(model, 3e-3, 0.1, "adamw" if optimizer_kind == "adamw" else "muon")
    if optimizer_kind == "torch-muon":
        cpu_muon = optimizer.optimizers[0]
        optimizer.optimizers[0] = torch.optim.Muon(cpu_muon.param_groups[0]["params"], lr=3e-3, weight_decay=0.1,
                                                   adjust_lr_fn="match_rms_adamw")
    batch = torch.randint(0, vocab_size, (4, 257))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        model(batch[:, :-1], targets=batch[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def one_step_sums(checkpoint: Path, count: int = 60) -> dict[str, float]:
    """Share right, greedy, of each kind of step of held-out problems' worked solutions, asked bare."""
    model, tokenizer = load_model(checkpoint), Tokenizer.load(checkpoint)
    kinds = 7  # + and -: tens, ones; ×: tens, ones, their sum
    rng, by_kind = random.Random(1), {}
    while min((len(v) for v in by_kind.values()), default=0) < count or len(by_kind) < kinds:
        problem = draw_problem(rng, 0, "eval")
        for key, step in worked_steps(problem):
            by_kind.setdefault(f"{problem.op} {key}", []).append(step)
    shares = {}
    for kind, steps in sorted(by_kind.items()):
        steps = steps[:count]
        prompts = [f"12 + 70 = 82, {s.text} =" for s in steps]  # as the pretraining drills state them
        replies = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=0))
        right = [(m := re.match(r"\s*(-?\d+)", r.text)) is not None and int(m.group(1)) == s.result
                 for r, s in zip(replies, steps)]
        shares[kind] = sum(right) / len(right)
    return shares


VERSUS = "AdamW / Muon / Muon with LayerDrop (the demo)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=SIZES["tiny"]["seconds"]["pretrain"],
                   help="the time budget of each pretraining run (the demo's first stage)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 s per pretraining run")
    p.add_argument("--write", action="store_true", help=f"replace the '## Optimizer' section of {RESULTS_PATH.name}")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()
    seconds = 20 if args.quick else args.seconds
    work = args.work or Path(tempfile.mkdtemp(prefix="nanomind-bench-optimizer-"))
    data, tokenizer = work / "data", work / "tokenizer"
    plan = SIZES["tiny"]
    if not (data / "pretrain.jsonl").exists():
        run_command(["data", "synth", "--out", str(data), "--size", plan["curriculum"], "--files", "pretrain"])
    if not (tokenizer / "tokenizer.json").exists():
        run_command(["tokenizer", "train", "--data", str(data / "pretrain.jsonl"), "--vocab-size", str(plan["vocab"]),
                     "--out", str(tokenizer)])
    vocab_size = Tokenizer.load(tokenizer).vocab_size

    step = {kind: step_seconds(kind, vocab_size, 5 if args.quick else 30) for kind in ["adamw", "torch-muon", "cpu-muon"]}
    print("step seconds:", step)
    batch = plan["batch"]["pretrain"]
    arms = {"adamw": pretrain_flags(batch, None, "adamw"), "muon": pretrain_flags(batch, None, "muon"),
            "demo": pretrain_flags(batch, dropped_layers(plan))}
    runs = {}
    for kind, flags in arms.items():
        out = work / kind
        run_command(["pretrain", "--data", str(data / "pretrain.jsonl"), "--tokenizer", str(tokenizer),
                     "--preset", plan["preset"], *flags, "--time-budget", str(seconds),
                     "--epochs", "20", "--eval-every", "96", "--out", str(out)])
        last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
        run_command(["convert", str(out / "model"), "--out", str(work / f"{kind}-half"), "--keep-layers",
                     plan["student_layers"]])
        held_out = {name: held_out_loss(load_model(folder), Tokenizer.load(folder), folder,
                                        [data / "eval_pretrain.jsonl"], kind="pretrain", seq_len=256)["loss"]
                    for name, folder in [("whole", out / "model"), ("half", work / f"{kind}-half")]}
        runs[kind] = dict(steps=last["step"], **held_out, sums=one_step_sums(out / "model"))
        print(kind, runs[kind])

    adamw, muon, demo = runs["adamw"], runs["muon"], runs["demo"]

    def three(show) -> str:  # one figure of each run, in VERSUS's order
        return " / ".join(show(run) for run in (adamw, muon, demo))

    kinds = list(adamw["sums"])
    rows = [
        ("Step time, torch.optim.Muon (bf16) vs fused AdamW", f"{step['torch-muon'] * 1e3:.0f} vs "
         f"{step['adamw'] * 1e3:.0f} ms", f"{step['torch-muon'] / step['adamw']:.2f}x", "", None),
        ("Step time, CpuMuon (fp32) vs fused AdamW", f"{step['cpu-muon'] * 1e3:.0f} vs {step['adamw'] * 1e3:.0f} ms",
         f"{step['cpu-muon'] / step['adamw']:.2f}x", "", None),
        (f"Pretraining {seconds:.0f} s: steps, {VERSUS}", three(lambda r: f"{r['steps']:,}"), "", "", None),
        (f"Pretraining {seconds:.0f} s: held-out loss, {VERSUS}", three(lambda r: f"{r['whole']:.3f}"), "",
         "lower with Muon, with and without LayerDrop", max(muon["whole"], demo["whole"]) < adamw["whole"]),
        (f"... the same model's layers {plan['student_layers']} alone, {VERSUS}", three(lambda r: f"{r['half']:.3f}"),
         "", "lowest with LayerDrop", demo["half"] < min(adamw["half"], muon["half"])),
        *[(f"... one-step sums right, `{kind}`, {VERSUS}", three(lambda r: f"{r['sums'][kind]:.0%}"), "", "", None)
          for kind in kinds],
    ]
    threads = torch.get_num_threads()
    base_flags = " ".join(pretrain_flags(batch, None)[:-2])  # without --optimizer muon
    capability = torch.backends.cpu.get_cpu_capability()
    section = "\n".join([
        "## Optimizer: AdamW and Muon for the demo's pretraining", "",
        f"The demo's `{plan['preset']}` model and first pretraining stage (the `{plan['curriculum']}` curriculum, "
        f"`{base_flags}`), "
        f"CPU, {threads} thread(s), ATen capability {capability}: `{COMMAND}`. "
        "Muon: orthogonalised momentum for the blocks' matrices, AdamW for embeddings and norms. The demo "
        f"(`demo.pretrain_flags`) pretrains with Muon and `--layer-drop 0.25 --layer-drop-layers {dropped_layers(plan)}`: its "
        "distillation student is the model with layers cut out, which costs a Muon-trained model more unless "
        "some steps train without them. Held-out loss: the curriculum's eval_pretrain.jsonl. "
        "One-step sums: the steps of held-out problems' worked solutions, asked bare as the pretraining drills "
        "state them, greedy.", "", *outcome_table(rows), ""])
    publish_section("## Optimizer", section, args.write)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
