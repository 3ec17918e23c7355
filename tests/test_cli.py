"""The `nanomind` command as a user runs it: real processes, real files."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanomind import demo
from nanomind.cli import build_parser, expand_config_file
from nanomind.demo import last_step

transformers = pytest.importorskip("transformers")


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "nanomind.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def all_commands(parser, words=()):
    """Every (sub)command's parser, found by walking the subparsers: a new command cannot be missed."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield words, parser
    for action in subparsers:
        for word, sub in action.choices.items():
            yield from all_commands(sub, (*words, word))


def test_every_command_documents_every_flag():
    commands = dict(all_commands(build_parser()))
    for expected in [("demo",), ("tokenizer", "train"), ("generate",), ("sft",), ("lora",), ("lora-merge",),
                     ("dpo",), ("distill",), ("serve",), ("chat",), ("export", "gguf")]:
        assert expected in commands
    for words, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"nanomind {' '.join(words)}: {action.option_strings} has no help"
    assert "generate" in run("--help").stdout


def test_the_main_job_trains_saves_and_samples(tmp_path):
    """The README's first command at its test size: every stage runs, the final checkpoint loads in
    transformers, and a rerun skips the finished stages."""
    result = run("demo", "--out", tmp_path / "demo", "--size", "test")
    for stage in ("data", "more-text", "tokenizer", "pretrain", "pretrain-more", "sft", "lora", "dpo", "student-init",
                  "teacher-answers", "distill", "student", "grpo", "agent", "eval", "chat", "report"):
        assert f"[{stage}]" in result.stdout
    # A second pretraining pass reads a larger curriculum's text; LoRA trains on the domain set plus as
    # many general conversations (replay).
    assert (f"pretrain --data {tmp_path / 'demo' / 'more-text' / 'pretrain.jsonl'} --init-from "
            f"{tmp_path / 'demo' / 'pretrain' / 'model'}") in result.stdout
    assert f"--init-from {tmp_path / 'demo' / 'pretrain-more' / 'model'}" in result.stdout
    domain = (tmp_path / "demo" / "data" / "lora_domain.jsonl").read_text(encoding="utf-8").splitlines()
    mix = (tmp_path / "demo" / "lora" / "domain_and_replay.jsonl").read_text(encoding="utf-8").splitlines()
    general = (tmp_path / "demo" / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert mix == domain + general[:len(domain)]
    # Distillation: the student keeps some of the SFT model's layers and has the first conversations;
    # the SFT model answers the next ones' prompts for it.
    split = tmp_path / "demo" / "distill-data"
    labeled = (split / "labeled.jsonl").read_text(encoding="utf-8").splitlines()
    assert labeled == general[:demo.DISTILL_LABELED]
    answers = (tmp_path / "demo" / "teacher-answers" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(answers) == demo.SIZES["test"]["prompts"]
    assert json.loads(answers[0])["conversations"][0] == json.loads(general[demo.DISTILL_LABELED])["conversations"][0]
    student_init = tmp_path / "demo" / "student-init" / "model"
    assert json.loads((student_init / "config.json").read_text())["num_hidden_layers"] == 1
    assert f"--data {split / 'labeled.jsonl'} {tmp_path / 'demo' / 'teacher-answers' / 'sft.jsonl'}" in result.stdout
    # GRPO: the RL prompts that ask for a sum, all of them and nothing else
    rl = [json.loads(line) for line in (tmp_path / "demo" / "data" / "rl.jsonl").open(encoding="utf-8")]
    sums = [r for r in rl if re.search(r"\d+ [-+×] \d+", r["conversations"][0]["content"])]
    grpo_data = (tmp_path / "demo" / "grpo" / "arithmetic.jsonl").read_text(encoding="utf-8").splitlines()
    assert 0 < len(grpo_data) < len(rl) and [json.loads(line) for line in grpo_data] == sums
    assert f"--data {tmp_path / 'demo' / 'grpo' / 'arithmetic.jsonl'}" in result.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    for section in ("## Stages", "## Curves", "## Held-out evaluations", "## Targets", "## Sample conversations"):
        assert section in report
    assert len(list((tmp_path / "demo" / "report").glob("*.png"))) >= 8 and "(thinking on)" in report
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert set(results) == {"pretrain", "sft", "lora", "dpo", "distill", "student", "grpo", "agent"}
    assert "preference_accuracy" in results["dpo"] and "tool_tasks" in results["agent"]
    assert "$ nanomind pretrain --data" in result.stdout and "M parameters" in result.stdout
    assert (tmp_path / "demo" / "lora" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "demo" / "distill" / "model" / "config.json").exists()
    assert "nanomind chat --model" in result.stdout and "nanomind serve --model" in result.stdout
    checkpoint = tmp_path / "demo" / "agent" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    rerun = run("demo", "--out", tmp_path / "demo", "--size", "test")
    for stage in ("pretrain", "pretrain-more", "sft", "lora", "dpo", "student-init", "teacher-answers", "distill",
                  "student", "grpo", "agent", "eval"):
        assert f"[{stage}] already done, skipping" in rerun.stdout
    # The plain-SFT student took exactly as many steps as the distilled one.
    assert last_step(tmp_path / "demo" / "student") == last_step(tmp_path / "demo" / "distill")
    assert "gap to the teacher closed" in report
    ids = tokenizer("3 plus 4 equals", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], tokenizer.vocab_size)

    generated = run("generate", "--model", checkpoint, "--prompt", "The colour of", "--max-new-tokens", 8)
    assert generated.stdout.startswith("The colour of")
    assert "tokens/s" in generated.stderr
    chat = run("generate", "--model", checkpoint, "--prompt", "hi", "--chat", "--think", "--max-new-tokens", 4,
               "--temperature", 0.8, "--top-p", 0.9, "--seed", 1)
    assert "tokens/s" in chat.stderr


def stub_demo_work(monkeypatch, tmp_path, run_command, evaluate_stages=lambda *a, **k: None):
    """run_demo with `run_command` in place of each command and no real data, evaluation or report."""
    monkeypatch.setattr(demo, "run_command", run_command)
    monkeypatch.setattr(demo, "evaluate_stages", evaluate_stages)
    monkeypatch.setattr(demo, "last_step", lambda folder: 7)
    monkeypatch.setattr(demo, "write_report", lambda *a, **k: tmp_path / "report.md")
    monkeypatch.setattr(demo, "chat_samples", lambda *a, **k: [])
    monkeypatch.setattr(demo, "held_out_questions", lambda *a, **k: [])
    monkeypatch.setattr(demo, "write_replay_mix", lambda domain, general, out: out)
    monkeypatch.setattr(demo, "write_arithmetic_prompts", lambda prompts, out: out)
    monkeypatch.setattr(demo, "split_conversations",
                        lambda conversations, folder, labeled, prompts, write: (folder / "labeled.jsonl", folder / "prompts.jsonl"))


@pytest.mark.parametrize("size", sorted(demo.SIZES))
def test_every_demo_size_plans_commands_that_parse(tmp_path, monkeypatch, size):
    """`--size small` is too slow for the suite: check that every command it would run is valid."""
    commands = []

    def parse_only(argv):
        commands.append(argv)
        build_parser().parse_args(expand_config_file(argv))

    stub_demo_work(monkeypatch, tmp_path, parse_only)
    demo.run_demo(tmp_path / "demo", size=size)
    planned = [c[0] for c in commands]
    more_text = ["data", "pretrain"] if demo.SIZES[size]["more_text"] else []
    assert planned == ["data", "tokenizer", "pretrain", *more_text, "sft", "lora", "dpo", "convert", "generate",
                       "distill", "sft", "rl", "rl"]
    sft = commands[planned.index("sft")]
    pretrained = "pretrain-more" if more_text else "pretrain"
    assert sft[sft.index("--init-from") + 1] == str(tmp_path / "demo" / pretrained / "model")
    distill, student = commands[planned.index("distill")], commands[len(planned) - 3]
    assert student[student.index("--max-steps") + 1] == "7"
    labeled = str(tmp_path / "demo" / "distill-data" / "labeled.jsonl")
    assert distill[distill.index("--data") + 1:distill.index("--teacher")] == [
        labeled, str(tmp_path / "demo" / "teacher-answers" / "sft.jsonl")]
    assert student[student.index("--data") + 1] == labeled and student[student.index("--data") + 2].startswith("--")
    init = str(tmp_path / "demo" / "student-init" / "model")
    assert distill[distill.index("--init-from") + 1] == init == student[student.index("--init-from") + 1]


def simulated_tiny_demo(tmp_path, monkeypatch, speedup: float, teacher_seconds: float) -> tuple[list[int], float]:
    """The tiny demo's time budgets and its end time on a fake clock: each training command takes its
    budget and its start-up, pretraining logs `speedup` times the reference machine's tokens/s, and the
    evaluation takes its reserve divided by `speedup`."""
    plan, clock, budgets = demo.SIZES["tiny"], [0.0], []

    def run_for_a_while(argv):
        if "--time-budget" in argv:
            budgets.append(int(argv[argv.index("--time-budget") + 1]))
            clock[0] += budgets[-1] + plan["reserve"]["per_stage"]
            folder = Path(argv[argv.index("--out") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            speed = plan["reserve"]["tokens_per_s"] * speedup
            (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens_per_s": speed}) + "\n"
                                                          for i in range(3)))
        else:
            clock[0] += teacher_seconds if argv[0] == "generate" else 2

    def evaluate(*args, **kwargs):
        clock[0] += plan["reserve"]["eval_and_report"] / speedup

    monkeypatch.setattr(demo, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    stub_demo_work(monkeypatch, tmp_path, run_for_a_while, evaluate)
    demo.run_demo(tmp_path / "demo", size="tiny")
    assert len(budgets) == len(plan["seconds"])
    assert all(0 < b <= planned for b, planned in zip(budgets, plan["seconds"].values()))
    return budgets, clock[0]


def test_tiny_demo_shrinks_its_stages_to_end_by_its_deadline(tmp_path, monkeypatch):
    deadline, reserve = demo.SIZES["tiny"]["deadline"], demo.SIZES["tiny"]["reserve"]
    as_planned, end = simulated_tiny_demo(tmp_path / "a", monkeypatch, 1.0, reserve["teacher_answers"])
    assert end <= deadline + 10  # one second of rounding a stage at most
    # The teacher 3x slower than reserved: the stages after it give up the difference.
    slow_teacher, end = simulated_tiny_demo(tmp_path / "b", monkeypatch, 1.0, 3 * reserve["teacher_answers"])
    assert end <= deadline + 10 and slow_teacher[-1] < as_planned[-1] and slow_teacher[:5] == as_planned[:5]
    # A machine twice as fast keeps less for generation once pretraining shows it: more for the stages after.
    fast, end = simulated_tiny_demo(tmp_path / "c", monkeypatch, 2.0, reserve["teacher_answers"] / 2)
    assert end <= deadline + 10 and fast[0] == as_planned[0] and sum(fast[1:]) > sum(as_planned[1:])


def test_scaled_budget_shares_the_time_left_in_proportion_to_the_plan():
    seconds = {"pretrain": 200, "sft": 100, "grpo": 100}
    assert demo.scaled_budget(seconds, "pretrain", 800) == 200  # time to spare: as planned, never more
    assert demo.scaled_budget(seconds, "pretrain", 200) == 100  # half the time: half of each
    assert demo.scaled_budget(seconds, "sft", 100) == 50  # sft and grpo share what is left
    assert demo.scaled_budget(seconds, "grpo", -30) == 1  # past the deadline: a token second


def test_tokenizer_train_and_bad_input_errors(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello world 你好"}\n' * 50 + '{"txt": "wrong key"}\n', encoding="utf-8")
    result = run("tokenizer", "train", "--data", data, "--vocab-size", 300, "--out", tmp_path / "tok", check=False)
    assert result.returncode == 2
    assert f"{data}:51" in result.stderr and "Traceback" not in result.stderr

    data.write_text('{"text": "hello world 你好"}\n' * 50, encoding="utf-8")
    run("tokenizer", "train", "--data", data, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()

    missing = run("generate", "--model", tmp_path / "nope", "--prompt", "x", check=False)
    assert missing.returncode == 2 and "no config.json" in missing.stderr


def test_presets_lists_the_sizes():
    out = run("presets").stdout
    assert "base-moe" in out and "63.91M" in out and "198.42M" in out


def test_data_download_without_network_fails_clearly(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = subprocess.run([sys.executable, "-m", "nanomind", "data", "download", "dpo.jsonl", "--out", tmp_path],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "could not download dpo.jsonl" in result.stderr and "nanomind data synth" in result.stderr
    unknown = run("data", "download", "nope.jsonl", "--out", tmp_path, check=False)
    assert unknown.returncode == 2 and "sft_t2t_mini.jsonl" in unknown.stderr
