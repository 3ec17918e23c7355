"""Outcomes of reinforcement learning on the built-in curriculum, and rollout throughput.

One run on this machine, starting from the SFT model that `bench_finetune.py` trains (run it first,
same --work folder):
  GRPO      `nanomind rl --algo grpo --reward math` on the arithmetic prompts of rl.jsonl; exact-match
            accuracy on the held-out arithmetic questions of eval_rl.jsonl before and after (target: +10
            points or more)
  agent     `nanomind rl --agent` on agent_rl.jsonl; held-out tool-task success (eval_agent_rl.jsonl)
            before and after
  rollouts  G = 8 samples of each of 8 prompts: decoded together by the batched KV-cache generator vs
            one sample at a time (target >= 4x)

  python benchmarks/bench_rl.py [--quick] [--write] [--work DIR]

Models already trained in the --work folder are reused: delete its grpo/ and agent/ after changing
the settings below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_core import RESULTS_PATH, outcome_table, publish_section
from nanomind.checkpoint import load_model
from nanomind.demo import AGENT_SETTINGS, GRPO_SETTINGS, run_command, write_arithmetic_prompts
from nanomind.evaluation import answer_accuracy, tool_use_accuracy
from nanomind.generation import SamplingParams, generate
from nanomind.report import ARITHMETIC_REPLY_TOKENS, TOOL_REPLY_TOKENS, is_arithmetic, steps_share
from nanomind.tokenizer import Tokenizer


def records(path: Path, keep=lambda record: True) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        return [(f"{path}:{i}", r) for i, line in enumerate(f, 1) if keep(r := json.loads(line))]


def rollout_speed(model, tokenizer, prompts: list[str], group: int, max_new_tokens: int) -> tuple[float, float]:
    """Generated tokens/s: all prompts x G samples in one batch, vs one sample at a time."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0, eos_ids=[])  # full length
    batch = [p for p in prompts for _ in range(group)]
    start = time.perf_counter()
    together = sum(len(c.token_ids) for c in generate(model, tokenizer, batch, params))
    together_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = sum(len(generate(model, tokenizer, [p], params)[0].token_ids) for p in batch)
    alone_s = time.perf_counter() - start
    return together / together_s, alone / alone_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few steps")
    p.add_argument("--write", action="store_true", help=f"replace the '## Reinforcement learning' section of {RESULTS_PATH.name}")
    p.add_argument("--work", type=Path, default=Path("/tmp/nanomind-bench-finetune"),
                   help="the working folder of bench_finetune.py (its sft/model and data/ are used)")
    args = p.parse_args()
    steps = {"grpo": 8, "agent": 4} if args.quick else {"grpo": 120, "agent": 60}
    work, data, started = args.work, args.work / "data", time.perf_counter()
    sft = work / "sft" / "model"
    if not (sft / "config.json").exists():
        raise SystemExit(f"{sft} is missing: run benchmarks/bench_finetune.py --work {work} first")
    tokenizer = Tokenizer.load(sft)
    greedy = SamplingParams(max_new_tokens=ARITHMETIC_REPLY_TOKENS, temperature=0)
    arithmetic = records(data / "eval_rl.jsonl", is_arithmetic)
    agent_cases = records(data / "eval_agent_rl.jsonl")

    grpo, agent = work / "grpo", work / "agent"
    common = ["--init-from", str(sft), "--warmup-steps", "5", "--device", "cpu", "--eval-every", "1000000"]
    if not (grpo / "model" / "config.json").exists():
        # as the demo trains it: on the RL prompts that are arithmetic, with its GRPO settings
        arithmetic_prompts = write_arithmetic_prompts(data / "rl.jsonl", grpo / "arithmetic.jsonl")
        run_command(["rl", "--algo", "grpo", "--data", str(arithmetic_prompts), *GRPO_SETTINGS, "--batch-size", "8",
                     "--max-steps", str(steps["grpo"]), "--out", str(grpo), *common])
    if not (agent / "model" / "config.json").exists():
        run_command(["rl", "--agent", "--algo", "grpo", "--data", str(data / "agent_rl.jsonl"), *AGENT_SETTINGS,
                     "--batch-size", "4", "--max-steps", str(steps["agent"]), "--out", str(agent), *common])

    base = load_model(sft)
    math_before = answer_accuracy(base, tokenizer, arithmetic, "math", greedy)
    math_after = answer_accuracy(load_model(grpo / "model"), tokenizer, arithmetic, "math", greedy)
    tool_greedy = SamplingParams(max_new_tokens=TOOL_REPLY_TOKENS, temperature=0)
    tools_before = tool_use_accuracy(base, tokenizer, agent_cases, params=tool_greedy)
    tools_after = tool_use_accuracy(load_model(agent / "model"), tokenizer, agent_cases, params=tool_greedy)
    prompts = [tokenizer.apply_chat_template(r["conversations"][:-1], add_generation_prompt=True)
               for _, r in arithmetic[:8]]
    together, alone = rollout_speed(base, tokenizer, prompts, group=8, max_new_tokens=48)

    gain = 100 * (math_after["accuracy"] - math_before["accuracy"])
    steps_shown = [steps_share(m["details"]) for m in (math_before, math_after)]
    rows = [
        (f"GRPO: held-out arithmetic exact match ({len(arithmetic)} questions)",
         f"{math_before['accuracy']:.1%} -> {math_after['accuracy']:.1%}", f"{gain:+.1f} points", ">= +10 points",
         gain >= 10),
        ("GRPO: held-out arithmetic answers that show their steps", f"{steps_shown[0]:.0%} -> {steps_shown[1]:.0%}",
         "", "", None),
        (f"Agent RL: held-out tool tasks fully right ({len(agent_cases)} cases)",
         f"{tools_before['all']:.1%} -> {tools_after['all']:.1%}", "", "a gain", tools_after["all"] > tools_before["all"]),
        ("Agent RL: final answer right / valid calls", f"{tools_before['final_answer']:.0%} / "
         f"{tools_before['valid_arguments']:.0%} -> {tools_after['final_answer']:.0%} / {tools_after['valid_arguments']:.0%}",
         "", "", None),
        ("Rollouts, G = 8 x 8 prompts: batched vs one at a time, tokens/s", f"{together:,.0f} vs {alone:,.0f}",
         f"{together / alone:.1f}x", ">= 4x", together / alone >= 4),
    ]
    table = outcome_table(rows)
    section = "\n".join([
        "## Reinforcement learning", "",
        f"From the SFT model of the fine-tuning benchmark, CPU, one run ({(time.perf_counter() - started) / 60:.0f} min): "
        f"`python benchmarks/bench_rl.py{' --quick' if args.quick else ''} --write`. GRPO: {steps['grpo']} steps "
        "on the RL prompts that are arithmetic (8 prompts per rollout, 2 passes x 2 minibatches, "
        f"math reward: `{' '.join(GRPO_SETTINGS)}`). Agent RL: {steps['agent']} steps of GRPO on multi-turn tool "
        f"rollouts of 4 prompts, with the demo's settings (`{' '.join(AGENT_SETTINGS)}`). Accuracies are greedy "
        f"answers on the held-out files (tool replies of up to {TOOL_REPLY_TOKENS} tokens).", "", *table, ""])
    publish_section("## Reinforcement learning", section, args.write)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
