"""Distillation: the loss against a hand computation, the tokenizer check, a distilled student that
generalises better than plain SFT on the same few conversations, and teacher answers written as SFT data."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from nanomind.checkpoint import load_model, save_checkpoint
from nanomind.cli import main
from nanomind.data import read_records
from nanomind import distill
from nanomind.distill import (assistant_message, distillation_loss, distillation_stage, load_teacher,
                              write_teacher_answers)
from nanomind.generation import SamplingParams, generate
from nanomind.model import NanoMind
from nanomind.prepare import PrepareOptions, load_manifest, open_rows, prepare
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer
from nanomind.trainer import StageInputs, TrainingError, token_loss

TEACHER = ["--preset", "tiny", "--hidden-size", "64", "--num-layers", "2", "--intermediate-size", "160",
           "--head-dim", "16", "--num-heads", "4", "--num-kv-heads", "2"]
QUIET = ["--eval-every", "0", "--device", "cpu"]


def nanomind(args: list) -> None:
    """The `nanomind` command, in this process."""
    main([str(a) for a in args])


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic conversations, a tokenizer, prepared data, and a teacher trained on all of it."""
    d = tmp_path_factory.mktemp("distill")
    synthesize(d / "synth", size="tiny", seed=0)
    train_tokenizer([d / "synth" / "sft.jsonl", d / "synth" / "pretrain.jsonl"], vocab_size=400, out_dir=d / "tok")
    (d / "few.jsonl").write_text("".join(lines(d / "synth" / "sft.jsonl")[:48]))
    for source, folder in (("synth/sft.jsonl", "all"), ("few.jsonl", "few"), ("synth/eval_sft.jsonl", "eval")):
        prepare([d / source], d / "tok", d / folder, PrepareOptions(kind="sft", seq_len=128, val_fraction=0.0),
                verbose=False)
    nanomind(["sft", "--data", d / "all", "--tokenizer", d / "tok", *TEACHER, "--batch-size", 8, "--lr", 5e-3,
              "--max-steps", 150, *QUIET, "--out", d / "teacher"])
    return d


def validation_loss(model_dir: Path, world: Path) -> float:
    """Cross-entropy per assistant token on the held-out conversations."""
    tokenizer = Tokenizer.load(world / "tok")
    rows = open_rows(world / "eval", "train", load_manifest(world / "eval", tokenizer, "sft"), tokenizer.pad_id)
    with torch.no_grad():
        loss_sum, n_tokens, _ = token_loss(load_model(model_dir), rows.rows(range(len(rows))))
    return (loss_sum / n_tokens).item()


# ----------------------------------------------------------------------------------------------
# The loss


def sft_batch(vocab_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab_size, (3, 12), generator=g)
    targets = torch.randint(0, vocab_size, (3, 12), generator=g)
    targets[:, :5] = -100  # the prompt
    targets[1, 9:] = -100  # padding
    return {"inputs": inputs, "targets": targets}


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_a_teacher_equal_to_the_student_leaves_only_alpha_times_the_cross_entropy(kl):
    model = random_model(tiny_config())
    batch = sft_batch(model.config.vocab_size)
    logits = model(batch["inputs"]).logits
    loss_sum, n_tokens, metrics = distillation_loss(logits, logits.detach().clone(), batch["targets"],
                                                    alpha=0.3, temperature=2.0, kl=kl)
    sft_sum, sft_tokens, _ = token_loss(model, batch)
    assert n_tokens == sft_tokens == 3 * 7 - 3
    assert metrics["kl"].abs() < 1e-6
    torch.testing.assert_close(loss_sum, 0.3 * sft_sum)
    torch.testing.assert_close(metrics["ce"], sft_sum / sft_tokens)


def reference_loss(student, teacher, targets, alpha, temperature, kl, vocab_size):
    """The formula written out position by position, in float64, from nested lists."""
    def log_softmax(row):
        top = max(row)
        log_total = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - log_total for x in row]

    total = ce_total = kl_total = 0.0
    count = 0
    for b in range(len(targets)):
        for t in range(len(targets[b])):
            target = targets[b][t]
            if target == -100:
                continue
            ce = -log_softmax(student[b][t])[target]  # over the student's full width
            log_s = log_softmax([x / temperature for x in student[b][t][:vocab_size]])
            log_t = log_softmax([x / temperature for x in teacher[b][t][:vocab_size]])
            log_p, log_q = (log_t, log_s) if kl == "forward" else (log_s, log_t)  # KL(p || q)
            divergence = sum(math.exp(a) * (a - c) for a, c in zip(log_p, log_q))
            total += alpha * ce + (1 - alpha) * temperature ** 2 * divergence
            ce_total, kl_total, count = ce_total + ce, kl_total + divergence, count + 1
    return total, count, ce_total / count, kl_total / count


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_the_loss_matches_the_formula_computed_by_hand(kl):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 5, generator=g) * 2
    teacher = torch.randn(2, 4, 7, generator=g) * 2  # two padding columns beyond the tokenizer's 5 ids
    targets = torch.tensor([[-100, 3, 0, -100], [4, -100, -100, 1]])
    loss_sum, n_tokens, metrics = distillation_loss(student, teacher, targets, alpha=0.3, temperature=2.5, kl=kl,
                                                    vocab_size=5)
    expected, count, ce, divergence = reference_loss(student.tolist(), teacher.tolist(), targets.tolist(),
                                                     0.3, 2.5, kl, vocab_size=5)
    assert n_tokens == count == 4
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(divergence, rel=1e-5) and divergence > 0.05


def test_logits_of_different_widths_need_the_tokenizer_vocabulary():
    with pytest.raises(ValueError, match="differ in width"):
        distillation_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 7), torch.tensor([[1, 2]]), 0.5, 1.0)


def test_an_moe_student_adds_its_balance_loss_and_the_teacher_stays_frozen(world, tmp_path):
    tokenizer = Tokenizer.load(world / "tok")
    save_checkpoint(random_model(tiny_config(moe=True, vocab_size=tokenizer.vocab_size), seed=1), tmp_path / "teacher",
                    tokenizer=tokenizer)
    student = random_model(tiny_config(moe=True, vocab_size=tokenizer.vocab_size)).train()
    args = argparse.Namespace(teacher=tmp_path / "teacher", alpha=0.5, temperature=1.5, kl="forward",
                              tokenizer=world / "tok", init_from=None)
    stage = distillation_stage(StageInputs(args, None, None, student, tokenizer, None, torch.device("cpu"), world))
    batch = sft_batch(tokenizer.vocab_size)
    loss_sum, n_tokens, metrics = stage.loss_fn(student, batch)

    teacher = load_model(tmp_path / "teacher")
    out = student(batch["inputs"])
    expected, _, _ = distillation_loss(out.logits, teacher(batch["inputs"]).logits, batch["targets"], 0.5, 1.5)
    expected = expected + student.config.router_aux_loss_coef * out.aux_loss * n_tokens
    torch.testing.assert_close(loss_sum, expected)
    assert set(metrics) == {"ce", "kl", "aux_loss"}
    loss_sum.backward()
    assert all(p.grad is not None for p in student.parameters())
    frozen = load_teacher(tmp_path / "teacher", tokenizer, "cpu")
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


# ----------------------------------------------------------------------------------------------
# The tokenizer check


def test_a_teacher_with_another_tokenizer_is_refused(world, tmp_path, capsys):
    train_tokenizer([world / "synth" / "sft.jsonl"], vocab_size=300, out_dir=tmp_path / "other_tok")
    other = Tokenizer.load(tmp_path / "other_tok")
    save_checkpoint(NanoMind(tiny_config(vocab_size=other.vocab_size), verbose=False), tmp_path / "other_teacher",
                    tokenizer=other)
    with pytest.raises(SystemExit) as exit_info:
        nanomind(["distill", "--teacher", tmp_path / "other_teacher", "--data", world / "few",
                  "--init-from", world / "teacher" / "model", "--max-steps", 1, *QUIET, "--out", tmp_path / "run"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "the teacher's tokenizer" in error and "vocabularies of 300 and 400 tokens" in error, error
    assert "nanomind generate" in error  # what to do instead

    # Same size, different tokens: the fingerprints tell them apart.
    train_tokenizer([world / "synth" / "pretrain.jsonl"], vocab_size=400, out_dir=tmp_path / "same_size_tok")
    with pytest.raises(TrainingError, match="same vocabulary size, but different tokens"):
        load_teacher(tmp_path / "same_size_tok", Tokenizer.load(world / "tok"), "cpu")


# ----------------------------------------------------------------------------------------------
# It works: a student distilled on few conversations generalises better than one trained by SFT


def test_a_distilled_student_gets_closer_to_the_teacher_than_plain_sft(world, tmp_path):
    tokenizer = Tokenizer.load(world / "tok")
    torch.manual_seed(1)
    student = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, intermediate_size=64), verbose=False)
    save_checkpoint(student, tmp_path / "init", tokenizer=tokenizer)
    # Same initial weights, the same 48 conversations in the same order, the same 100 steps.
    common = ["--data", world / "few", "--init-from", tmp_path / "init", "--batch-size", 16, "--lr", 1e-2,
              "--max-steps", 100, *QUIET]
    nanomind(["sft", *common, "--out", tmp_path / "sft"])
    nanomind(["distill", "--teacher", world / "teacher" / "model", "--alpha", 0.5, *common, "--out", tmp_path / "kd"])

    teacher, sft, distilled = (validation_loss(folder, world) for folder in
                               (world / "teacher" / "model", tmp_path / "sft" / "model", tmp_path / "kd" / "model"))
    closed = (sft - distilled) / (sft - teacher)
    print(f"\nvalidation loss: teacher {teacher:.3f}, SFT student {sft:.3f}, distilled student {distilled:.3f} "
          f"({closed:.0%} of the gap closed)")
    assert teacher < distilled < sft and closed > 0.25, (teacher, sft, distilled)
    metrics = [json.loads(line) for line in lines(tmp_path / "kd" / "metrics.jsonl")]
    assert metrics[-1]["kl"] < 0.5 * metrics[0]["kl"]  # the student learned the teacher's distributions


# ----------------------------------------------------------------------------------------------
# Black-box: the teacher's answers as SFT data


def prompts_file(world: Path, path: Path) -> list[dict]:
    """RL prompts (placeholder answer), SFT conversations (answer to be replaced), one with tools."""
    rl, sft = lines(world / "synth" / "rl.jsonl")[:5], lines(world / "synth" / "sft.jsonl")
    with_tools = next(line for line in sft if '"tools"' in line)
    path.write_text("".join(rl + sft[:3] + [with_tools]))
    return [r for _, _, r in read_records([path], "rl")]


def chat_prompt(tokenizer, messages: list[dict], thinking: bool) -> tuple[str, list | None]:
    tools = next((m["tools"] for m in messages if m.get("tools")), None)  # MiniMind keeps them on the system turn
    prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, open_thinking=thinking)
    return prompt, tools


def test_generate_writes_the_teachers_answers_as_sft_data(world, tmp_path):
    records = prompts_file(world, tmp_path / "prompts.jsonl")
    command = ["generate", "--model", world / "teacher" / "model", "--data", tmp_path / "prompts.jsonl",
               "--out", tmp_path / "answers.jsonl", "--batch-size", 4, "--max-new-tokens", 40, "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "nanomind.cli", *map(str, command)], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(records)} conversations" in result.stdout and "stopped at --max-new-tokens 40" in result.stdout

    model, tokenizer = load_model(world / "teacher" / "model"), Tokenizer.load(world / "tok")
    written = [r["conversations"] for _, _, r in read_records([tmp_path / "answers.jsonl"], "sft")]
    assert len(written) == len(records)
    params = SamplingParams(max_new_tokens=40)
    for record, conversation in zip(records, written):
        prompt_messages = record["conversations"]  # the input without its trailing assistant turn
        assert conversation[:-1] == prompt_messages
        prompt, tools = chat_prompt(tokenizer, prompt_messages, thinking=False)
        alone = generate(model, tokenizer, [prompt], params)[0]  # one at a time, greedy
        assert conversation[-1] == assistant_message(alone.text, thinking=False, parse_tools=tools is not None)
    assert any(c[-1]["content"] for c in written)

    # `nanomind sft` takes the file as it is.
    nanomind(["sft", "--data", tmp_path / "answers.jsonl", "--init-from", world / "teacher" / "model",
              "--seq-len", 128, "--batch-size", 2, "--max-steps", 1, *QUIET, "--out", tmp_path / "sft"])
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()


def test_with_thinking_the_reasoning_goes_to_reasoning_content(world, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "SORT_WINDOW_BATCHES", 1)  # windows of one batch: 4 prompts, then 2
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(lines(world / "synth" / "eval_sft.jsonl")[:6]))
    model, tokenizer = load_model(world / "teacher" / "model"), Tokenizer.load(world / "tok")
    params = SamplingParams(max_new_tokens=60)
    summary = write_teacher_answers(model, tokenizer, path, tmp_path / "out.jsonl", params, batch_size=4,
                                    thinking=True)
    assert summary["written"] == 6
    records = [r["conversations"] for _, _, r in read_records([path], "rl")]
    replies = [r["conversations"][-1] for _, _, r in read_records([tmp_path / "out.jsonl"], "sft")]
    for messages, reply in zip(records, replies):
        prompt, _ = chat_prompt(tokenizer, messages, thinking=True)
        assert prompt.endswith("<think>\n")
        text = generate(model, tokenizer, [prompt], params)[0].text
        reasoning, _, content = text.partition("</think>")  # the prompt opened the block; the model closes it
        assert reply.get("reasoning_content", "").strip() == reasoning.strip()
        assert reply["content"].strip() == content.strip()


def test_a_reply_becomes_an_assistant_message_with_reasoning_and_tool_calls():
    reply = ('The user wants 2 + 3.\n</think>\n\nLet me compute.\n'
             '<tool_call>\n{"name": "calc", "arguments": {"x": 5}}\n</tool_call>')
    assert assistant_message(reply, thinking=True, parse_tools=True) == {
        "role": "assistant", "content": "Let me compute.", "reasoning_content": "The user wants 2 + 3.",
        "tool_calls": [{"name": "calc", "arguments": '{"x": 5}'}]}
    assert assistant_message("Five.", thinking=False, parse_tools=False) == {"role": "assistant", "content": "Five."}
    # Cut off by the length limit while still thinking: all of it is reasoning.
    assert assistant_message("Hmm, 2 + 3", thinking=True, parse_tools=False) == {
        "role": "assistant", "content": "", "reasoning_content": "Hmm, 2 + 3"}


def test_a_bad_prompt_line_names_file_and_line(world, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    good = lines(world / "synth" / "rl.jsonl")[:2]
    path.write_text(good[0] + good[1] + '{"conversations": [{"role": "robot", "content": "hi"}]}\n')
    args = ["generate", "--model", world / "teacher" / "model", "--data", path, "--out", tmp_path / "out.jsonl",
            "--max-new-tokens", 8, "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        nanomind(args)
    assert exit_info.value.code == 2
    assert f"{path}:3: unknown role" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() and list(tmp_path.iterdir()) == [path]  # no partial output

    with pytest.raises(SystemExit):  # no room left in the context for the answer
        nanomind([*args[:-4], "--max-new-tokens", 100_000, "--device", "cpu"])
    assert f"{path}:1: prompt too long" in capsys.readouterr().err

    nanomind([*args, "--skip-bad"])
    out = capsys.readouterr().out
    assert "wrote 2 conversations" in out and "1 x unknown role" in out and f"{path}:3" in out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
