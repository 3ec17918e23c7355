"""The report card of a demo run: held-out evaluations of every stage's model, then DIR/report.md
with plots (matplotlib) of what each stage did.

`evaluate_stages(DIR)` scores each stage's model on the curriculum's held-out files and writes
DIR/eval/results.json; `write_report(DIR)` turns the run's metrics, timings and those results into
DIR/report.md and DIR/report/*.png. Targets that are missed are shown as missed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Room for one reply of an agent, in evaluation and agent RL: two tool calls with their JSON arguments
# take about 90 tokens and reasoning before them 20 more (at 64 the second call was always cut off).
TOOL_REPLY_TOKENS = 160
# Room for an arithmetic answer, in evaluation and GRPO: one that shows its steps takes up to 65 tokens
# and its end of turn (47 × 6 in English: three steps and the result).
ARITHMETIC_REPLY_TOKENS = 96
STAGES = ["pretrain", "sft", "lora", "dpo", "distill", "student", "grpo", "agent"]  # evaluated
TIMED_STAGES = ["pretrain", "pretrain-more", "sft", "lora", "dpo", "student-init", "teacher-answers", "distill",
                   "student", "grpo", "agent"]  # in the Stages table (those that ran)
ARITHMETIC = re.compile(r"\d+\s*[-+×x*/÷]\s*\d+")
EQUATION = re.compile(ARITHMETIC.pattern + r"\s*=\s*-?\d+")  # a step with its result


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


def _records(path: Path, limit: int, keep=lambda record: True) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            record = json.loads(line)
            if keep(record):
                out.append((f"{path}:{i}", record))
            if len(out) == limit:
                break
    return out


def is_arithmetic(record: dict) -> bool:
    return bool(ARITHMETIC.search(next(m["content"] for m in record["conversations"] if m["role"] == "user")))


def shows_steps(reply: str) -> bool:
    """Whether an arithmetic reply works the result out in its answer (two or more equations, such as
    "47 + 30 = 77. ... 77 + 8 = 85.") rather than stating it; reasoning in <think> does not count."""
    from .rewards import answer_text

    return len(EQUATION.findall(answer_text(reply))) >= 2


def steps_share(details: list[dict]) -> float:
    """The share of answer_accuracy's replies that show their steps."""
    return sum(shows_steps(c["reply"]) for c in details) / max(len(details), 1)


def answer_format_accuracy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96) -> float:
    """Share of held-out questions whose greedy reply is a well-formed answer: not empty, ended by the
    model's own end-of-turn within the limit, no stray think or tool-call tags."""
    from .generation import SamplingParams, generate

    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    good = 0
    for completion in generate(model, tokenizer, prompts, params):
        text = completion.text.strip()
        good += bool(text) and completion.finish_reason == "stop" and not re.search(r"</?(think|tool_call)>", text)
    return good / max(len(prompts), 1)


def evaluate_stages(out: str | Path, limit: int = 200) -> dict:
    """Every stage model on the held-out files it is about; results also go to OUT/eval/results.json."""
    from .checkpoint import load_model
    from .evaluation import answer_accuracy, held_out_loss, preference_accuracy, tool_use_accuracy
    from .generation import SamplingParams
    from .lora import load_adapter
    from .tokenizer import Tokenizer

    out = Path(out)
    data, sft = out / "data", out / "sft" / "model"
    tokenizer = Tokenizer.load(sft)
    models = {name: out / name / "model" for name in STAGES if name != "lora"}
    if (out / "pretrain-more" / "model").is_dir():  # SFT started from the second pretraining pass
        models["pretrain"] = out / "pretrain-more" / "model"

    def model(name):
        if name == "lora":
            return load_adapter(load_model(sft), out / "lora" / "adapter")
        return load_model(models[name])

    def loss(m, file: str) -> float:
        return held_out_loss(m, tokenizer, sft, [data / file], seq_len=768, limit_rows=limit)["loss"]

    greedy = SamplingParams(max_new_tokens=ARITHMETIC_REPLY_TOKENS, temperature=0)
    tool_greedy = SamplingParams(max_new_tokens=TOOL_REPLY_TOKENS, temperature=0)  # per reply
    questions = held_out_questions(data / "eval_sft.jsonl", limit)
    arithmetic = _records(data / "eval_rl.jsonl", limit, is_arithmetic)
    agent_cases = _records(data / "eval_agent_rl.jsonl", limit)
    results: dict[str, dict] = {}
    for name in STAGES:
        m = model(name)
        row = {"sft_loss": loss(m, "eval_sft.jsonl")}
        if name in ("sft", "lora"):
            row["domain_loss"] = loss(m, "eval_lora_domain.jsonl")
        if name not in ("pretrain", "student"):
            row["answer_format"] = answer_format_accuracy(m, tokenizer, questions)
        if name in ("sft", "dpo"):
            row["preference_accuracy"] = preference_accuracy(m, tokenizer, sft, [data / "eval_dpo.jsonl"],
                                                             seq_len=256)["accuracy"]
        if name in ("dpo", "grpo", "agent"):
            replies = answer_accuracy(m, tokenizer, arithmetic, "math", greedy)
            row["arithmetic_exact"] = replies["accuracy"]
            row["arithmetic_shows_steps"] = steps_share(replies["details"])
        if name in ("sft", "grpo", "agent"):  # SFT too: GRPO on arithmetic alone can erode tool use
            tools = tool_use_accuracy(m, tokenizer, agent_cases, params=tool_greedy)
            row["tool_tasks"], row["tool_final_answer"] = tools["all"], tools["final_answer"]
        results[name] = row
        print(f"  {name:9} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# ----------------------------------------------------------------------------------------------
# The report


def stage_metrics(folder: Path) -> list[dict]:
    """The rows a training stage logged to FOLDER/metrics.jsonl (none when it has no such file)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot(path: Path, title: str, rows: list[dict], series: list[str]) -> bool:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in series:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=key)
            drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    plt.close(fig)
    return drawn


# (stage, plot title, metric series)
PLOTS = [
    ("pretrain", "pretraining loss", ["loss", "val_loss"]),
    ("pretrain-more", "pretraining loss, second pass (the larger curriculum's text)", ["loss", "val_loss"]),
    ("sft", "SFT loss", ["loss", "val_loss"]),
    ("lora", "LoRA loss (domain set)", ["loss", "val_loss"]),
    ("dpo", "DPO loss", ["loss", "val_loss"]),
    ("dpo", "DPO reward accuracy and margin", ["reward_accuracy", "reward_margin", "val_reward_accuracy"]),
    ("distill", "distillation: CE and KL per token", ["loss", "ce", "kl"]),
    ("grpo", "GRPO reward", ["reward", "reward_math"]),
    ("grpo", "GRPO response length and KL", ["response_length", "kl", "approx_kl_rollout"]),
    ("agent", "agent RL reward", ["reward", "reward_math", "reward_tool_calls"]),
    ("agent", "agent RL: tool calls, turns, response length", ["tool_calls", "turns", "response_length"]),
]


def _targets(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met): the stage gains the project promises."""
    r = lambda stage, key: results.get(stage, {}).get(key)  # noqa: E731
    rows = []
    if r("sft", "answer_format") is not None:
        rows.append(("SFT answer-format accuracy", f"{r('sft', 'answer_format'):.0%}", ">= 95%",
                     r("sft", "answer_format") >= 0.95))
    if r("dpo", "preference_accuracy") is not None:
        rows.append(("DPO held-out preference accuracy",
                     f"{r('sft', 'preference_accuracy'):.0%} -> {r('dpo', 'preference_accuracy'):.0%}", ">= 80%",
                     r("dpo", "preference_accuracy") >= 0.8))
    if r("grpo", "arithmetic_exact") is not None:
        gain = 100 * (r("grpo", "arithmetic_exact") - r("dpo", "arithmetic_exact"))
        steps = "" if r("grpo", "arithmetic_shows_steps") is None else (
            f"; answers that show their steps {r('dpo', 'arithmetic_shows_steps'):.0%} -> "
            f"{r('grpo', 'arithmetic_shows_steps'):.0%}")
        rows.append(("GRPO arithmetic exact-match gain",
                     f"{r('dpo', 'arithmetic_exact'):.1%} -> {r('grpo', 'arithmetic_exact'):.1%} ({gain:+.1f} points"
                     f"{steps})", ">= +10 points", gain >= 10))
    if r("lora", "domain_loss") is not None:
        forgetting = r("lora", "sft_loss") - r("sft", "sft_loss")
        rows.append(("LoRA domain loss gain, general loss change",
                     f"{r('sft', 'domain_loss') - r('lora', 'domain_loss'):+.2f}, {forgetting:+.2f}",
                     "a gain, little forgetting", r("lora", "domain_loss") < r("sft", "domain_loss") and forgetting < 0.1))
    if r("distill", "sft_loss") is not None and r("student", "sft_loss") is not None:
        # The plain-SFT student's gap to the teacher, and how much of it the distilled student closes.
        teacher, plain, distilled = r("sft", "sft_loss"), r("student", "sft_loss"), r("distill", "sft_loss")
        closed = (plain - distilled) / (plain - teacher) if plain > teacher else float("nan")
        rows.append(("distillation (half-depth student, 200 conversations; distilled also on the teacher's answers "
                     "to more prompts): gap to the teacher closed (eval_sft loss: teacher / plain-SFT student / "
                     "distilled student)", f"{closed:.0%} ({teacher:.2f} / {plain:.2f} / {distilled:.2f})",
                     ">= 50%", closed >= 0.5))
    if r("agent", "tool_tasks") is not None:
        sft_tools = "" if r("sft", "tool_tasks") is None else f" (SFT model: {r('sft', 'tool_tasks'):.1%})"
        rows.append(("agent RL held-out tool tasks, from the GRPO model",
                     f"{r('grpo', 'tool_tasks'):.1%} -> {r('agent', 'tool_tasks'):.1%}{sft_tools}", "a gain",
                     r("agent", "tool_tasks") > r("grpo", "tool_tasks")))
    return rows


def write_report(out: str | Path, samples: list[tuple[str, str]] = ()) -> Path:
    """DIR/report.md (+ DIR/report/*.png) from the run's metrics, stage timings and DIR/eval/results.json."""
    out = Path(out)
    figures = out / "report"
    figures.mkdir(parents=True, exist_ok=True)
    results_path = out / "eval" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    lines = ["# nanomind demo: report card", "",
             f"Run folder `{out}`. Every number below comes from this run's files: `*/metrics.jsonl`, `*/DONE`, "
             "`eval/results.json`.", "", "## Stages", "",
             "| stage | wall time | steps | tokens read | tokens/s | final loss | final val loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in TIMED_STAGES:
        rows = stage_metrics(out / name)
        done = out / name / "DONE"
        wall = done.read_text().strip() if done.exists() else "-"
        if not rows:  # a stage that trains nothing (convert, generate): its time only
            if done.exists():
                lines.append(f"| {name} | {wall} | - | - | - | - | - |")
            continue
        tokens = sum(r.get("tokens", 0) for r in rows)
        speed = sum(r.get("tokens_per_s", 0) for r in rows) / len(rows)
        val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
        lines.append(f"| {name} | {wall} | {rows[-1]['step']} | {tokens:,} | {speed:,.0f} | {rows[-1]['loss']:.3f} | "
                     f"{'-' if val is None else f'{val:.3f}'} |")
    lines += ["", "## Curves", ""]
    for i, (stage, title, series) in enumerate(PLOTS):
        name = f"{i:02d}-{stage}.png"
        if _plot(figures / name, title, stage_metrics(out / stage), series):
            lines.append(f"![{title}](report/{name})")
    lines += ["", "## Held-out evaluations", ""]
    if results:
        keys = sorted({k for row in results.values() for k in row})
        lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, row in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")
        lines += ["", "Losses are per assistant token on the held-out SFT conversations (`sft_loss`) and on the "
                      "LoRA domain set (`domain_loss`); accuracies are shares of held-out items.", "",
                  "## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
        for what, measured, target, met in _targets(results):
            lines.append(f"| {what} | {measured} | {target} | "
                         f"{'not measured here' if met is None else ('yes' if met else '**no (shortfall)**')} |")
    else:
        lines.append("No evaluation results (the eval stage has not run).")
    if samples:
        lines += ["", "## Sample conversations (final model, greedy)", ""]
        for question, answer in samples:
            lines += [f"- **user:** {question}", f"  **nanomind:** {answer or '(empty)'}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
