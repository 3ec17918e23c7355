"""The main job: the whole pipeline, offline on a CPU, in minutes.

  1. data       `nanomind data synth`: the built-in bilingual curriculum        -> DIR/data
  2. tokenizer  `nanomind tokenizer train` on its pretraining and SFT text      -> DIR/tokenizer
  3. pretrain   `nanomind pretrain` on the curriculum's text, with Muon; a     -> DIR/pretrain/model
                quarter of the steps skip the layers the student will not have (LayerDrop)
     pretrain-more  then on a larger curriculum's text about the same world   -> DIR/pretrain-more/model
                (fresh sentences, written by the more-text stage)
  4. sft        `nanomind sft` on its conversations (reasoning, tool calls)     -> DIR/sft/model
  5. lora       `nanomind lora` on the domain set mixed with as many general    -> DIR/lora/adapter
                conversations (replay against forgetting): an adapter on the SFT model
  6. dpo        `nanomind dpo` on chosen/rejected pairs, from the SFT model     -> DIR/dpo/model
  7. distill    a student with half the SFT model's layers (`nanomind convert --keep-layers`) has
                200 answered conversations; the SFT model answers more prompts (`nanomind generate
                --data`) and `nanomind distill` teaches the student on both     -> DIR/distill/model
     student    `nanomind sft`: the same student by plain SFT on its 200, as   -> DIR/student/model
                many steps (the yardstick: how much of the gap to the teacher distillation closes)
  8. grpo       `nanomind rl --algo grpo` on the RL prompts that are arithmetic, from DPO -> DIR/grpo/model
  9. agent      `nanomind rl --agent`: multi-turn tool use (calculator, units)  -> DIR/agent/model
 10. eval       every stage's model on the held-out files                       -> DIR/eval/results.json
 11. report     curves, timings, evaluations against targets, sample chats      -> DIR/report.md

Each stage runs the very command a user would type (they are printed), writes its own folder and a
`DONE` marker; a rerun skips finished stages, so a killed demo continues where it stopped.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path

from .report import (ARITHMETIC_REPLY_TOKENS, TOOL_REPLY_TOKENS, evaluate_stages, held_out_questions, is_arithmetic,
                     stage_metrics, write_report)

SIZES = {
    # curriculum, the larger one whose pretraining text is read too (the same world, fresh sentences),
    # tokenizer vocabulary, model preset and flags, the teacher's layers the student keeps, how many
    # prompts the teacher answers for it, seconds per training stage, the batch sizes of pretraining and
    # of the chat stages (SFT, LoRA, distillation), held-out items per evaluation,
    # and where set, the whole run's deadline in seconds with what it keeps for the work that has no
    # time budget (the teacher's answers, evaluation and the report, each stage's start and saves; as
    # measured on the slowest 2-core machine so far, whose pretraining read 6,800 tokens/s with AdamW: once
    # pretraining has shown how fast this machine is, the first two are scaled by it; Muon's steps cost
    # more, so the demo's pretraining reads fewer tokens/s and the reserve errs on the safe side). The stages share
    # what the deadline leaves in proportion to their seconds (scaled_budget). Distillation has 80 s: at
    # the 181 steps a slow machine trains in 60 s it closed 45% of the gap to the teacher, at 240 64%.
    "test": dict(curriculum="tiny", more_text="small", vocab=600, preset="tiny",
                 model=["--hidden-size", "64", "--num-layers", "2", "--intermediate-size", "192", "--head-dim", "16"],
                 student_layers="0", prompts=40,
                 seconds=dict(pretrain=4, pretrain_more=4, sft=6, lora=3, dpo=3, distill=3, student=6, grpo=4, agent=4),
                 batch=dict(pretrain=4, chat=2), eval_limit=8,
                 deadline=None),
    "tiny": dict(curriculum="small", more_text="medium", vocab=2048, preset="tiny", model=[],
                 student_layers="0,3", prompts=2400,
                 seconds=dict(pretrain=225, pretrain_more=225, sft=200, lora=30, dpo=30, distill=80, student=60, grpo=130,
                              agent=120), batch=dict(pretrain=4, chat=2), eval_limit=200,
                 deadline=1170, reserve=dict(teacher_answers=90, eval_and_report=120, per_stage=6, tokens_per_s=6800)),
    # MiniMind2-small's 26M model on the larger curriculum: about an hour on a 2-core CPU; on a GPU the
    # same time budgets train many more steps.
    "small": dict(curriculum="medium", more_text=None, vocab=6400, preset="small", model=[],
                  student_layers="0,1,6,7", prompts=2400,
                  seconds=dict(pretrain=1200, sft=600, lora=150, dpo=240, distill=300, student=600, grpo=420,
                               agent=420),
                  batch=dict(pretrain=16, chat=8), eval_limit=400, deadline=None),
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


DISTILL_LABELED = 200  # answered conversations the student has of its own

# GRPO on arithmetic, as the demo and benchmarks/bench_rl.py run it. lr 1e-4 with a KL pull to the
# starting model (beta 0.04): of the settings tried from one DPO model (the README's demo section has
# the figures), the largest gain that kept the general held-out loss close to the DPO model's; without
# the pull a larger gain cost much of that loss. Replies have room to show their steps, which is what
# GRPO learns to do (synth.WORKED_ANSWER_SHARE).
GRPO_SETTINGS = ["--reward", "math", "--num-generations", "8", "--max-new-tokens", str(ARITHMETIC_REPLY_TOKENS),
                 "--temperature", "1.0", "--lr", "1e-4", "--beta", "0.04"]

# Agent RL with tools, as the demo and benchmarks/bench_rl.py run it. No KL pull: its reference would be
# the model it starts from, which GRPO on arithmetic alone has left calling tools less often than the
# SFT model did, and agent RL has to undo that (the README's demo section has the runs behind this).
AGENT_SETTINGS = ["--num-generations", "4", "--max-turns", "3", "--max-new-tokens", str(TOOL_REPLY_TOKENS),
                  "--max-prompt-len", "1024", "--max-total-len", "1536", "--lr", "1e-4", "--beta", "0"]


def pretrain_flags(batch_size: int, drop: str | None, optimizer: str = "muon") -> list[str]:
    """How the demo pretrains (both passes), as benchmarks/bench_optimizer.py runs it too.

    With Muon, which learns much faster per second than AdamW here: on a slow machine that is what
    leaves the model able to carry out the steps of a sum, which GRPO then rewards. A Muon-trained model
    loses much more than an AdamW-trained one when layers are cut out, though, and the distillation
    student is the SFT model without the layers `drop` names; so where the demo passes `drop` (its first
    pass) a quarter of the steps train without them (LayerDrop), and the model learns to work with and
    without them (the README's demo section has the runs)."""
    flags = ["--seq-len", "256", "--batch-size", str(batch_size), "--lr", "3e-3", "--warmup-steps", "20",
             "--optimizer", optimizer]
    return flags + (["--layer-drop", "0.25", "--layer-drop-layers", drop] if drop else [])


def run_demo(out_dir: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    out = Path(out_dir)
    plan = SIZES[size]
    seconds = plan["seconds"]
    started = time.perf_counter()
    data, tokenizer = out / "data", out / "tokenizer"
    stage(out, "data", ["data", "synth", "--out", str(data), "--size", plan["curriculum"], "--seed", str(seed)])
    stage(out, "tokenizer", ["tokenizer", "train", "--data", str(data / "pretrain.jsonl"), str(data / "sft.jsonl"),
                             "--vocab-size", str(plan["vocab"]), "--out", str(tokenizer)])

    def training(command: str, name: str, *flags: str) -> list[str]:
        # Every training stage: time-boxed, checkpointed, resumable; epochs only cap very fast machines.
        key = name.replace("-", "_")
        budget = seconds[key]
        if plan["deadline"] and not (out / name / "DONE").exists():
            reserve = plan["reserve"]
            stages_left = len(seconds) - list(seconds).index(key)
            generating = reserve["eval_and_report"] + (
                0 if (out / "teacher-answers" / "DONE").exists() else reserve["teacher_answers"])
            kept = generating * slowness(out / "pretrain", reserve["tokens_per_s"]) + reserve["per_stage"] * stages_left
            budget = scaled_budget(seconds, key, plan["deadline"] - (time.perf_counter() - started) - kept)
            if budget < seconds[key]:
                print(f"[{name}] a time budget of {budget} s (planned {seconds[key]} s), to end by the "
                      f"{plan['deadline']} s deadline", flush=True)
        return [command, *flags, "--time-budget", str(budget), "--epochs", "20", "--resume",
                "--out", str(out / name), "--device", device, "--seed", str(seed), "--eval-every", "96",
                "--save-every", "96"]

    # Small batches for the tiny model: in a fixed time it learns far more from many small steps than
    # from a few large ones (measured on a 2-core CPU, 180 s of pretraining on the curriculum's
    # arithmetic: validation loss 1.01 at batch 16, 0.87 at 8, 0.64 at 4 and 0.84 at 2; SFT for 170 s:
    # 0.63 at batch 8, 0.29 at 2). The 26M `small` model keeps larger ones, which a GPU needs to be busy.
    batch = plan["batch"]
    # LayerDrop in the first pass only: in the second too, the model lost much of its carrying (47 + 38)
    pretraining = pretrain_flags(batch["pretrain"], dropped_layers(plan))
    stage(out, "pretrain", training("pretrain", "pretrain", "--data", str(data / "pretrain.jsonl"),
                                    "--tokenizer", str(tokenizer), "--preset", plan["preset"], *plan["model"],
                                    *pretraining))
    pretrained = out / "pretrain" / "model"
    if plan["more_text"]:
        # A second pass on new sentences about the same world, not the same ones again: that is what
        # teaches a model this small to compute and copy numbers, which GRPO then sharpens
        # (benchmarks/bench_finetune.py measured it).
        more = out / "more-text"
        stage(out, "more-text", ["data", "synth", "--out", str(more), "--size", plan["more_text"], "--files",
                                 "pretrain", "--seed", str(seed)])
        stage(out, "pretrain-more", training("pretrain", "pretrain-more", "--data", str(more / "pretrain.jsonl"),
                                             "--init-from", str(pretrained),
                                             *pretrain_flags(batch["pretrain"], None)))
        pretrained = out / "pretrain-more" / "model"
    sft = out / "sft" / "model"
    chat_flags = ["--seq-len", "768", "--batch-size", str(batch["chat"]), "--warmup-steps", "10"]
    stage(out, "sft", training("sft", "sft", "--data", str(data / "sft.jsonl"), "--init-from", str(pretrained),
                               *chat_flags, "--lr", "1e-3"))
    lora_data = out / "lora" / "domain_and_replay.jsonl"
    if not (out / "lora" / "DONE").exists():
        write_replay_mix(data / "lora_domain.jsonl", data / "sft.jsonl", lora_data)
    stage(out, "lora", training("lora", "lora", "--data", str(lora_data), "--init-from", str(sft),
                                *chat_flags, "--lr", "5e-4", "--rank", "8", "--alpha", "16"))
    stage(out, "dpo", training("dpo", "dpo", "--data", str(data / "dpo.jsonl"), "--init-from", str(sft),
                               "--seq-len", "256", "--batch-size", "8", "--warmup-steps", "10", "--lr", "1e-4",
                               "--beta", "0.1", "--rpo-alpha", "1.0", "--precompute-ref"))
    # Distillation where it pays: the student has few answered conversations, and the teacher answers
    # many more prompts (black-box), whose next-token distributions the student then learns (white-box).
    # The student is the teacher with half its layers (depth pruning), so it starts knowing the world.
    labeled, prompts = split_conversations(data / "sft.jsonl", out / "distill-data", DISTILL_LABELED, plan["prompts"],
                                           write=not (out / "student" / "DONE").exists())
    student_init = out / "student-init" / "model"
    stage(out, "student-init", ["convert", str(sft), "--out", str(student_init), "--keep-layers", plan["student_layers"]])
    answers = out / "teacher-answers" / "sft.jsonl"
    # Answers without reasoning (no --think) are quicker to write, and the demo has no minute to spare; the
    # student sees reasoning in its own 200 conversations.
    stage(out, "teacher-answers", ["generate", "--model", str(sft), "--data", str(prompts), "--out", str(answers),
                                   "--batch-size", "64", "--max-new-tokens", "160", "--device", device])
    stage(out, "distill", training("distill", "distill", "--data", str(labeled), str(answers), "--teacher", str(sft),
                                   "--init-from", str(student_init), *chat_flags, "--lr", "1e-3",
                                   "--alpha", "0.5", "--temperature", "1.0"))
    # The yardstick: the same student (same initialisation) by plain SFT on the answered conversations it
    # has, for as many steps as the distilled one took.
    stage(out, "student", training("sft", "student", "--data", str(labeled), "--init-from", str(student_init),
                                   *chat_flags, "--lr", "1e-3", "--max-steps", str(last_step(out / "distill"))))
    arithmetic = out / "grpo" / "arithmetic.jsonl"
    if not (out / "grpo" / "DONE").exists():
        write_arithmetic_prompts(data / "rl.jsonl", arithmetic)
    stage(out, "grpo", training("rl", "grpo", "--algo", "grpo", "--data", str(arithmetic),
                                "--init-from", str(out / "dpo" / "model"), *GRPO_SETTINGS, "--batch-size", "4",
                                "--warmup-steps", "5"))
    stage(out, "agent", training("rl", "agent", "--agent", "--algo", "grpo", "--data", str(data / "agent_rl.jsonl"),
                                 "--init-from", str(out / "grpo" / "model"), *AGENT_SETTINGS, "--batch-size", "4",
                                 "--warmup-steps", "5"))
    final = out / "agent" / "model"
    stage(out, "eval", lambda: evaluate_stages(out, limit=plan["eval_limit"]))
    samples = chat_samples(final, held_out_questions(data / "eval_sft.jsonl", 4), data / "eval_agent_rl.jsonl")
    report = write_report(out, samples)
    print(f"[report] {report}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s. The final model is {final} (a Hugging Face Qwen3 folder);\n"
          f"the SFT model with the domain adapter: --model {sft} --adapter {out / 'lora' / 'adapter'}.\nTry:\n"
          f"  nanomind chat --model {final}\n"
          f"  nanomind serve --model {final}    # then open http://127.0.0.1:8998\n"
          f"  nanomind generate --model {final} --chat --prompt 'What is 12 plus 7?'")
    return final


def dropped_layers(plan: dict) -> str:
    """The layers the distillation student will not have, which pretraining learns to do without."""
    from .model import PRESETS

    flags = plan["model"]
    layers = int(flags[flags.index("--num-layers") + 1]) if "--num-layers" in flags else \
        PRESETS[plan["preset"]]["num_hidden_layers"]
    kept = {int(i) for i in plan["student_layers"].split(",")}
    return ",".join(str(i) for i in range(layers) if i not in kept)


def slowness(pretrain: Path, reference_tokens_per_s: float) -> float:
    """How much slower than the reference machine this one is (below 1: faster), from the tokens/s its
    finished pretraining stage logged; 1 until that stage is done."""
    if not (pretrain / "DONE").exists():
        return 1.0
    speeds = [row["tokens_per_s"] for row in stage_metrics(pretrain) if row.get("tokens_per_s")]
    if not speeds:
        return 1.0
    return min(4.0, max(0.25, reference_tokens_per_s / statistics.median(speeds)))


def scaled_budget(seconds: dict[str, int], name: str, time_left: float) -> int:
    """Stage `name`'s planned seconds, scaled so that it and the stages after it (the plan's order) fit in
    `time_left`: on a machine slower than the plan assumed, every remaining stage gives up the same share
    and the run still ends by its deadline. Never more than planned, never under one second."""
    names = list(seconds)
    planned = sum(seconds[s] for s in names[names.index(name):])
    return max(1, int(seconds[name] * min(1.0, max(time_left, 0.0) / planned)))


def write_replay_mix(domain: Path, general: Path, out: Path) -> Path:
    """The domain set followed by as many conversations of the general set: training on both (the rows
    are shuffled) is the usual remedy for forgetting, as the adapter keeps seeing what the base does well."""
    domain_lines = domain.read_text(encoding="utf-8").splitlines()
    with open(general, encoding="utf-8") as f:
        replay = [line.rstrip("\n") for _, line in zip(domain_lines, f)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in domain_lines + replay), encoding="utf-8")
    return out


def write_arithmetic_prompts(prompts: Path, out: Path) -> Path:
    """The RL prompts that are arithmetic (the rest ask for facts): GRPO's steps all go to the skill it is
    measured on."""
    with open(prompts, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and is_arithmetic(json.loads(line))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return out


def split_conversations(conversations: Path, folder: Path, labeled: int, prompts: int,
                        write: bool = True) -> tuple[Path, Path]:
    """The first `labeled` conversations (answers kept) and the next `prompts` ones (for the teacher to
    answer), as two files in `folder` (left as they are with write=False: the stages using them are done)."""
    if not write:
        return folder / "labeled.jsonl", folder / "prompts.jsonl"
    with open(conversations, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(labeled + prompts), f)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labeled.jsonl").write_text("".join(lines[:labeled]), encoding="utf-8")
    (folder / "prompts.jsonl").write_text("".join(lines[labeled:]), encoding="utf-8")
    return folder / "labeled.jsonl", folder / "prompts.jsonl"


def last_step(folder: Path) -> int:
    """The last training step a stage logged in its metrics.jsonl."""
    return max(row["step"] for row in stage_metrics(folder))


def chat_samples(checkpoint: Path, conversations: list[list[dict]], agent_file: Path) -> list[tuple[str, str]]:
    """Greedy answers of the final model: held-out questions, one with thinking, one tool task."""
    from .agent import run_agents
    from .checkpoint import load_model
    from .generation import SamplingParams, generate
    from .tokenizer import Tokenizer
    from .tools import builtin_tools

    model, tokenizer = load_model(checkpoint), Tokenizer.load(checkpoint)
    params = SamplingParams(max_new_tokens=ARITHMETIC_REPLY_TOKENS, temperature=0)  # a worked sum fits
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    samples = [(c[-1]["content"], done.text.strip()) for c, done in zip(conversations, generate(model, tokenizer,
                                                                                              prompts, params))]
    thinking = tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True, open_thinking=True)
    samples.append((conversations[0][-1]["content"] + "  (thinking on)",
                    "<think>" + generate(model, tokenizer, [thinking], params)[0].text.strip()))
    with open(agent_file, encoding="utf-8") as f:
        task = json.loads(f.readline())["conversations"]
    (trajectory,) = run_agents(model, tokenizer, [task], builtin_tools(),
                               SamplingParams(max_new_tokens=TOOL_REPLY_TOKENS, temperature=0), max_turns=3)
    shown = " | ".join(trajectory.replies)
    samples.append((next(m["content"] for m in task if m["role"] == "user") + "  (with tools)",
                    " -> ".join(f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)}) = {r}"
                                for c, r in zip(trajectory.tool_calls, trajectory.tool_results)) + f" || {shown}"))
    print("[chat] held-out questions, greedy answers:")
    for question, answer in samples:
        print(f"  user: {question}\n  nanomind: {answer}")
    return samples
