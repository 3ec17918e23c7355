"""Knowledge distillation: a small student learns from a larger teacher.

White-box (`nanomind distill`): the student matches the teacher's next-token distributions on the
assistant tokens of SFT conversations, with

    loss per token = alpha * CE(student, data) + (1 - alpha) * T^2 * KL

where KL is KL(teacher_T || student_T) (forward, mass-covering) or KL(student_T || teacher_T)
(reverse, mode-seeking) between the temperature-T softened distributions; T^2 keeps the KL
gradients the size of the CE's as T grows (Hinton et al., 2015). The teacher may be larger, dense or
MoE, but must share the student's tokenizer: the two distributions are compared id by id. The run
logs `ce` and `kl` per token; `val_ce` is the number to compare with an SFT run's `val_loss`.

  nanomind distill --teacher runs/big/model --init-from runs/small/model --data sft.jsonl --out runs/distill
  nanomind distill --teacher runs/big/model --tokenizer tok --preset tiny --data sft.jsonl --out runs/kd \\
      --alpha 0.3 --temperature 2 --kl reverse

Black-box (`nanomind generate --data`): the teacher answers a file of prompts and the answers become
SFT data for any student, whatever its tokenizer:

  nanomind generate --model runs/big/model --data prompts.jsonl --out teacher_sft.jsonl --think
  nanomind sft --data teacher_sft.jsonl --init-from runs/small/model --out runs/small-sft
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .data import BadLines, BadRecord, DataError, conversation_tools, read_records
from .generation import SamplingParams, generate
from .model import NanoMind
from .reply_parser import ReplyParser
from .sft import SAMPLE_PROMPTS
from .tokenizer import Tokenizer
from .trainer import Stage, TrainingError, run_stage, unwrap

KL_DIRECTIONS = ("forward", "reverse")
# Black-box answers: how many batches' worth of prompts are sorted by length together.
SORT_WINDOW_BATCHES = 16


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float, kl: str = "forward",
                      vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """alpha * CE + (1 - alpha) * T^2 * KL, summed over the positions where targets != -100.

    Logits are (B, T, V). The CE is the student's over its full width, as in SFT; the KL compares
    the first `vocab_size` ids (the tokenizer's: wider logits are padding). Returns (loss sum,
    number of trained tokens, {"ce", "kl"} per token, detached).
    """
    trained = targets != -100
    # Only the trained rows of the logits, in fp32: (N, V) instead of (B, T, V).
    student, teacher = student_logits[trained].float(), teacher_logits[trained].float()
    n_tokens = trained.sum()
    ce = F.cross_entropy(student, targets[trained], reduction="sum")
    if vocab_size is None and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student and teacher logits differ in width ({student.shape[-1]} vs "
                         f"{teacher.shape[-1]}); pass vocab_size to compare the tokenizer's ids only")
    log_s = F.log_softmax(student[:, :vocab_size] / temperature, dim=-1)
    log_t = F.log_softmax(teacher[:, :vocab_size] / temperature, dim=-1)
    if kl == "forward":  # KL(teacher || student)
        kl_sum = (log_t.exp() * (log_t - log_s)).sum()
    elif kl == "reverse":  # KL(student || teacher)
        kl_sum = (log_s.exp() * (log_s - log_t)).sum()
    else:
        raise ValueError(f"unknown KL direction {kl!r}; expected one of {', '.join(KL_DIRECTIONS)}")
    loss_sum = alpha * ce + (1 - alpha) * temperature ** 2 * kl_sum
    per_token = n_tokens.clamp(min=1)
    return loss_sum, n_tokens, {"ce": ce.detach() / per_token, "kl": kl_sum.detach() / per_token}


def load_teacher(folder: Path, tokenizer: Tokenizer, device, tokenizer_source: str = "the student's") -> NanoMind:
    """The teacher checkpoint, frozen, in eval mode, on `device`; an error if its tokenizer is not `tokenizer`."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise TrainingError(f"{folder}: the teacher checkpoint has no tokenizer.json; distillation compares "
                            "token distributions id by id, so the teacher must come with its tokenizer")
    theirs = Tokenizer.load(folder)
    if theirs.fingerprint() != tokenizer.fingerprint():
        detail = (f"vocabularies of {theirs.vocab_size} and {tokenizer.vocab_size} tokens"
                  if theirs.vocab_size != tokenizer.vocab_size
                  else "same vocabulary size, but different tokens, merges or chat template")
        raise TrainingError(
            f"the teacher's tokenizer ({folder}) is not {tokenizer_source} ({detail}). White-box distillation "
            "compares the two models' distributions token id by token id, so they must share one tokenizer; "
            "for a teacher with another tokenizer, distill black-box: `nanomind generate --model TEACHER "
            "--data PROMPTS.jsonl --out SFT.jsonl`, then `nanomind sft` on that file")
    teacher = load_model(folder, device=device, dtype=torch.float32)
    if teacher.config.vocab_size < tokenizer.vocab_size:
        raise TrainingError(f"{folder}: the teacher's vocabulary ({teacher.config.vocab_size}) is smaller "
                            f"than its tokenizer's ({tokenizer.vocab_size})")
    return teacher.requires_grad_(False).eval()


def distillation_stage(inputs) -> Stage:
    args = inputs.args
    if not 0 <= args.alpha <= 1:
        raise TrainingError(f"--alpha must be in [0, 1] (the weight of the cross-entropy), got {args.alpha}")
    if args.temperature <= 0:
        raise TrainingError(f"--temperature must be > 0, got {args.temperature}")
    source = f"the student's ({args.tokenizer or args.init_from})"
    teacher = load_teacher(args.teacher, inputs.tokenizer, inputs.device, source)
    vocab_size = inputs.tokenizer.vocab_size

    def loss_fn(model, batch):
        with torch.no_grad():
            teacher_logits = teacher(batch["inputs"]).logits
        out = model(batch["inputs"])
        loss_sum, n_tokens, metrics = distillation_loss(out.logits, teacher_logits, batch["targets"], args.alpha,
                                                        args.temperature, args.kl, vocab_size)
        if out.aux_loss is not None:  # an MoE student keeps its experts balanced, as in token_loss
            loss_sum = loss_sum + unwrap(model).config.router_aux_loss_coef * out.aux_loss * n_tokens
            metrics["aux_loss"] = out.aux_loss.detach()
        return loss_sum, n_tokens, metrics

    return Stage("distill", inputs.train_rows, inputs.val_rows, loss_fn, sample_prompts=SAMPLE_PROMPTS,
                 chat_samples=True)


def main(args) -> dict:
    return run_stage(args, "sft", distillation_stage)


# ----------------------------------------------------------------------------------------------
# Black-box: the teacher's answers as SFT data


def write_teacher_answers(model, tokenizer, data, out, params: SamplingParams, batch_size: int = 16,
                          thinking: bool = False, skip_bad: bool = False) -> dict:
    """Answer every conversation of `data` (SFT or RL-prompt JSONL; a trailing assistant turn is
    dropped) with `model`, `batch_size` prompts decoded together, and write MiniMind SFT JSONL to
    `out` atomically. Returns {"written", "length_limited", "skipped"}."""
    out = Path(out)
    files = [data] if isinstance(data, (str, Path)) else list(data)
    bad = BadLines()
    prompts = _prompts(tokenizer, read_records(files, "rl", skip_bad, bad), thinking,
                       params.max_new_tokens, model.config.max_position_embeddings, skip_bad, bad)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written = length_limited = tokens = 0
    started = last_print = time.perf_counter()
    batches = itertools.count()  # a fixed --seed gives every batch its own (reproducible) random stream
    try:
        with tmp.open("w", encoding="utf-8") as f:
            while window := list(itertools.islice(prompts, batch_size * SORT_WINDOW_BATCHES)):
                completions = _answer_by_length(model, tokenizer, [ids for _, _, ids in window], params,
                                                batch_size, batches)
                for (messages, tools, _), completion in zip(window, completions):
                    reply = assistant_message(completion.text, thinking, parse_tools=tools is not None)
                    f.write(json.dumps({"conversations": [*messages, reply]}, ensure_ascii=False) + "\n")
                    length_limited += completion.finish_reason == "length"
                    tokens += len(completion.token_ids)
                written += len(window)
                if time.perf_counter() - last_print > 5:
                    last_print = time.perf_counter()
                    print(f"generate: {written} answered, {tokens / (last_print - started):,.0f} tokens/s",
                          flush=True)
        if not written:
            raise DataError(f"{', '.join(map(str, files))}: no conversations to answer")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {written} conversations to {out} in {time.perf_counter() - started:.1f}s; {length_limited} "
          f"stopped at --max-new-tokens {params.max_new_tokens}"
          + (f"\n{bad.summary()}" if bad.total else ""), flush=True)
    return {"written": written, "length_limited": length_limited, "skipped": bad.total}


def _answer_by_length(model, tokenizer, prompts: list[list[int]], params: SamplingParams, batch_size: int,
                      batches: Iterator[int]) -> list:
    """Completions of `prompts`, in their order, decoded `batch_size` at a time from the shortest prompt up.

    Prompts range from a short question to a system prompt with tool definitions ten times as long, and
    a batch is padded to its longest prompt: batches of prompts of about one length waste little.
    """
    completions = [None] * len(prompts)
    by_length = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    for start in range(0, len(prompts), batch_size):
        rows = by_length[start:start + batch_size]
        i = next(batches)
        batch_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
        for j, completion in zip(rows, generate(model, tokenizer, [prompts[j] for j in rows], batch_params)):
            completions[j] = completion
    return completions


def _prompts(tokenizer, records, thinking: bool, max_new_tokens: int, context: int, skip_bad: bool, bad: BadLines):
    """(messages, tools, prompt ids) per record; a prompt with no room for the answer is a bad line."""
    for path, line, record in records:
        messages = record["conversations"]
        tools = conversation_tools(messages)
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                             open_thinking=thinking))
        if len(ids) + max_new_tokens > context:
            error = BadRecord("prompt too long", f"{len(ids)} prompt tokens + --max-new-tokens {max_new_tokens} "
                                                 f"exceed the model's context of {context}")
            if not skip_bad:
                raise DataError(f"{path}:{line}: {error} (pass --skip-bad to skip such lines)")
            bad.add(f"{path}:{line}", error)
            continue
        yield messages, tools, ids


def assistant_message(text: str, thinking: bool, parse_tools: bool) -> dict:
    """A generated reply as a MiniMind assistant message: reasoning (when the model wrote some),
    content, and tool calls (when the conversation offers tools)."""
    parser = ReplyParser(thinking, parse_tools)
    parts = {"reasoning": "", "content": ""}
    calls = []
    for kind, value in parser.push(text) + parser.finish():
        if kind == "tool_call":
            calls.append(value)
        else:
            parts[kind] += value
    message = {"role": "assistant", "content": parts["content"]}
    if parts["reasoning"]:
        message["reasoning_content"] = parts["reasoning"]
    if calls:
        message["tool_calls"] = calls
    return message
