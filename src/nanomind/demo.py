"""The main job: the pipeline so far, offline on a CPU, in a few minutes.

  1. data       `nanomind data synth`: the built-in bilingual curriculum        -> DIR/data
  2. tokenizer  `nanomind tokenizer train` on its pretraining and SFT text      -> DIR/tokenizer
  3. pretrain   `nanomind pretrain` on the curriculum's text                    -> DIR/pretrain/model
  4. sft        `nanomind sft` on its conversations (reasoning, tool calls)     -> DIR/sft/model
  5. chat       a few held-out questions answered by the final model

Each stage runs the very command a user would type (they are printed), writes its own folder and a
`DONE` marker; a rerun skips finished stages, so a killed demo continues where it stopped. Later
stages (LoRA, DPO, distillation, RL, evaluation, report) join as they land.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

SIZES = {
    # size: (curriculum, model flags, pretrain seconds, sft seconds, vocabulary)
    "test": ("tiny", ["--hidden-size", "64", "--num-layers", "2", "--intermediate-size", "192", "--head-dim", "16"],
             8, 6, 600),
    "tiny": ("small", [], 150, 90, 2048),
}


def run_command(argv: list[str]) -> None:
    from .cli import build_parser, expand_config_file

    print("$ nanomind " + " ".join(shlex.quote(a) for a in argv), flush=True)
    args = build_parser().parse_args(expand_config_file(argv))
    args.func(args)


def stage(out: Path, name: str, argv_or_fn) -> Path:
    """Run a stage unless its DONE marker exists; return its folder."""
    folder = out / name
    if (folder / "DONE").exists():
        print(f"[{name}] already done, skipping ({folder})")
        return folder
    start = time.perf_counter()
    print(f"[{name}]", flush=True)
    argv_or_fn() if callable(argv_or_fn) else run_command(argv_or_fn)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "DONE").write_text(f"{time.perf_counter() - start:.1f}s\n")
    return folder


def held_out_questions(eval_file: Path, n: int) -> list[list[dict]]:
    questions = []
    with open(eval_file, encoding="utf-8") as f:
        for line in f:
            conversation = json.loads(line)["conversations"]
            first_user = next(i for i, m in enumerate(conversation) if m["role"] == "user")
            if not any(m.get("tools") for m in conversation):
                questions.append(conversation[:first_user + 1])
            if len(questions) == n:
                break
    return questions


def run_demo(out_dir: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    out = Path(out_dir)
    curriculum, model_flags, pretrain_seconds, sft_seconds, vocab = SIZES[size]
    started = time.perf_counter()
    data = out / "data"
    stage(out, "data", ["data", "synth", "--out", str(data), "--size", curriculum, "--seed", str(seed)])
    stage(out, "tokenizer", ["tokenizer", "train", "--data", str(data / "pretrain.jsonl"), str(data / "sft.jsonl"),
                             "--vocab-size", str(vocab), "--out", str(out / "tokenizer")])
    common = ["--device", device, "--seed", str(seed), "--eval-every", "50", "--save-every", "50"]
    stage(out, "pretrain", ["pretrain", "--data", str(data / "pretrain.jsonl"), "--tokenizer", str(out / "tokenizer"),
                            "--preset", "tiny", *model_flags, "--seq-len", "256", "--batch-size", "16",
                            "--lr", "3e-3", "--warmup-steps", "20", "--time-budget", str(pretrain_seconds),
                            "--epochs", "20", "--resume", "--out", str(out / "pretrain"), *common])
    stage(out, "sft", ["sft", "--data", str(data / "sft.jsonl"), "--init-from", str(out / "pretrain" / "model"),
                       "--seq-len", "768", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "10",
                       "--time-budget", str(sft_seconds), "--epochs", "20", "--resume", "--out", str(out / "sft"),
                       *common])
    final = out / "sft" / "model"
    chat_samples(final, held_out_questions(data / "eval_sft.jsonl", 4))
    print(f"\ndone in {time.perf_counter() - started:.0f}s. The final model is {final} (a Hugging Face Qwen3 folder).\n"
          f"Try:\n  nanomind generate --model {final} --chat --prompt 'What is 12 plus 7?'")
    return final


def chat_samples(checkpoint: Path, conversations: list[list[dict]]) -> None:
    from .checkpoint import load_model
    from .generation import SamplingParams, generate
    from .tokenizer import Tokenizer

    model, tokenizer = load_model(checkpoint), Tokenizer.load(checkpoint)
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    params = SamplingParams(max_new_tokens=48, eos_ids=[tokenizer.eos_id])
    print("[chat] held-out questions, greedy answers:")
    for conversation, completion in zip(conversations, generate(model, tokenizer, prompts, params)):
        print(f"  user: {conversation[-1]['content']}\n  nanomind: {completion.text.strip()}")
