"""Measuring a checkpoint: held-out loss, multiple choice, checked answers, tool use, and side-by-side chat.

`nanomind eval --task T` runs one of these on local files and writes the numbers as JSON:

    loss    held_out_loss: loss, perplexity and bits per byte on pretrain text or SFT conversations,
            tokenized exactly as for training (documents packed; conversations scored on the assistant
            tokens only), so the numbers compare directly with the trainer's validation loss
    choice  choice_accuracy: multiple choice (C-Eval, CMMLU, MMLU layouts) by the log-likelihood of each
            option, 0- or k-shot, per subject and overall
    math    answer_accuracy: answers generated for RL prompts, checked against their `gt` by
    exact   rewards.math_reward (numbers within a tolerance) or rewards.exact_reward
    tools   tool_use_accuracy: agent.run_agents on agent records; right tools, valid arguments, the
            right number of calls and the right final answer, per case
    chat    chat_answers: a fixed set of prompts answered by several checkpoints, shown side by side

Multiple choice scores the option TEXT by default: "Question: ...\nAnswer:" continued by " <option>",
the summed log-probability divided by the option's UTF-8 bytes (so long options are not penalised for
their length). At nanomind's sizes this measures what the model knows; scoring the option LETTER after
the listed options (`scoring="letter"`, as lm-evaluation-harness scores C-Eval, CMMLU and MMLU) mostly
measures a model's preference among the letters (every model in MiniMind's C-Eval table is at 24-31%).
Chinese questions use 问题：/答案： instead of Question:/Answer:. Few-shot examples are the first k other
questions of the same subject, in file order, with their correct answers.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .agent import Trajectory, run_agents
from .data import BadLines, BadRecord, DataError, check_record, conversation_tools, read_records
from .generation import SamplingParams, generate
from .prepare import PrepareOptions, load_manifest, open_rows, prepare
from .rewards import answer_text, exact_reward, extract_final_answer, math_reward, numbers_equal
from .tools import builtin_tools, resolve_tools

Progress = Callable[[int], None]  # called with how many more items are done


@torch.no_grad()
def held_out_loss(model, tokenizer, tokenizer_dir, files, kind: str = "sft", seq_len: int = 512,
                  batch_size: int = 8, limit_rows: int | None = None, progress: Progress | None = None) -> dict:
    """Mean next-token loss per scored token over `files` (kind "pretrain" or "sft"), with perplexity
    and bits per byte (the loss in bits spread over the UTF-8 bytes of the scored tokens, which
    compares models with different tokenizers)."""
    device = next(model.parameters()).device
    token_bytes = torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], device=device)
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="nanomind-eval-") as folder:
        prepare([Path(f) for f in files], tokenizer_dir, folder,
                PrepareOptions(kind=kind, seq_len=seq_len, val_fraction=0.0), verbose=False)
        rows = open_rows(folder, "train", load_manifest(folder, tokenizer, kind), tokenizer.pad_id)
        n_rows = min(len(rows), limit_rows or len(rows))
        loss_sum, tokens, n_bytes = 0.0, 0, 0
        for start in range(0, n_rows, batch_size):
            batch = {k: v.to(device) for k, v in rows.rows(range(start, min(start + batch_size, n_rows))).items()}
            scored = batch["targets"][batch["targets"] != -100]
            loss_sum += model(batch["inputs"], targets=batch["targets"]).loss.item() * len(scored)
            tokens += len(scored)
            n_bytes += int(token_bytes[scored].sum())
            if progress is not None:
                progress(len(batch["inputs"]))
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1),
            "tokens": tokens, "rows": n_rows}


@torch.no_grad()
def preference_accuracy(model, tokenizer, tokenizer_dir, files, seq_len: int = 512, batch_size: int = 8,
                        reference=None) -> dict:
    """Share of DPO pairs whose chosen answer the model scores above the rejected one (summed
    log-probability of the assistant tokens). With a `reference` model, the comparison is of the
    implicit rewards (policy minus reference log-probabilities), as DPO's reward accuracy."""
    from .dpo import sequence_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wins, margins, pairs = 0, 0.0, 0
    with tempfile.TemporaryDirectory(prefix="nanomind-eval-") as folder:
        prepare([Path(f) for f in files], tokenizer_dir, folder,
                PrepareOptions(kind="dpo", seq_len=seq_len, val_fraction=0.0), verbose=False)
        rows = open_rows(folder, "train", load_manifest(folder, tokenizer, "dpo"), tokenizer.pad_id)
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in rows.rows(range(start, min(start + batch_size, len(rows)))).items()}
            logps = sequence_logps(model(batch["inputs"]).logits, batch["targets"])[0]
            if reference is not None:
                logps = logps - sequence_logps(reference(batch["inputs"]).logits, batch["targets"])[0]
            chosen, rejected = logps.chunk(2)
            wins += int((chosen > rejected).sum())
            margins += float((chosen - rejected).sum())
            pairs += len(chosen)
    model.train(was_training)
    return {"accuracy": wins / max(pairs, 1), "mean_margin": margins / max(pairs, 1), "pairs": pairs}


# ----------------------------------------------------------------------------------------------
# Multiple choice


@dataclass
class ChoiceQuestion:
    subject: str
    question: str
    options: list[str]  # in letter order: A, B, C, ...
    answer: int  # index of the correct option
    where: str = ""  # file:line


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def subject_of(path: Path) -> str:
    """The subject a question file is about, from its name: computer_network_val.csv -> computer_network."""
    return re.sub(r"_(val|dev|test|validation|train)$", "", path.stem)


def read_choice_questions(paths) -> list[ChoiceQuestion]:
    """Multiple-choice questions from local files (folders are searched for .csv / .jsonl files):

    - CSV with a header naming a question and an answer column and single-letter option columns
      (C-Eval: id,question,A,B,C,D,answer[,explanation]; CMMLU: ,Question,A,B,C,D,Answer);
    - CSV without a header (MMLU): question, the options, answer;
    - JSONL with question, A, B, ... (or a "choices" list) and answer (a letter, or an index with
      "choices"), optionally a subject.

    The subject is the file name without a _val / _dev / _test suffix, unless a line says otherwise.
    A line that does not fit raises DataError naming file:line.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl", ".json"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such question file or folder")
    questions = []
    for path in files:
        reader = _json_lines if path.suffix in (".jsonl", ".json") else _choice_csv
        for line, fields in reader(path):
            try:
                questions.append(_choice_question(fields, subject_of(path), f"{path}:{line}"))
            except BadRecord as e:
                raise DataError(f"{path}:{line}: {e}") from None
    if not questions:
        raise DataError(f"{', '.join(map(str, paths))}: no questions found")
    return questions


def _choice_csv(path: Path):
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = None  # None: not decided yet; []: the file has none (question, options..., answer)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                names = [cell.strip() for cell in row]
                header = names if {"question", "answer"} <= {n.lower() for n in names} else []
                if header:
                    continue
            if header and len(row) != len(header):
                yield reader.line_num, {"_error": f"{len(row)} columns, the header has {len(header)}"}
            elif header:
                yield reader.line_num, dict(zip(header, row))
            elif len(row) < 4:
                yield reader.line_num, {"_error": f"{len(row)} columns; a file without a header needs question, "
                                                  "at least two options, answer"}
            else:
                yield reader.line_num, {"question": row[0], "answer": row[-1],
                                        **{LETTERS[i]: text for i, text in enumerate(row[1:-1])}}


def _json_lines(path: Path):
    """(line number, the line's JSON object, or {"_error": why not}) for each non-blank line."""
    with Path(path).open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                record = {"_error": f"not valid JSON ({e.msg} at column {e.colno})"}
            yield line, record if isinstance(record, dict) else {"_error": "the line is not a JSON object"}


def _choice_question(fields: dict, subject: str, where: str) -> ChoiceQuestion:
    expected = "expected question, options A, B, ... and answer"
    if "_error" in fields:
        raise BadRecord(fields["_error"], expected)
    lower = {str(k).strip().lower(): v for k, v in fields.items()}
    question = lower.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRecord("no question", expected)
    if isinstance(lower.get("choices"), list):
        options = [str(o) for o in lower["choices"]]
    else:
        upper = {str(k).strip(): v for k, v in fields.items()}
        options = [str(upper[letter]) for letter in itertools.takewhile(lambda c: c in upper, LETTERS)]
    if len(options) < 2:
        raise BadRecord("fewer than two options", expected)
    answer = lower.get("answer")
    letters = LETTERS[:len(options)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        index = answer
    elif isinstance(answer, str) and answer.strip().upper() in letters and answer.strip():
        index = letters.index(answer.strip().upper())
    else:
        hint = " (C-Eval's test split has no public answers: use the val split)" if answer in ("", None) else ""
        raise BadRecord("bad answer", f"answer is {answer!r}; expected one of {', '.join(letters)}{hint}")
    return ChoiceQuestion(str(lower.get("subject") or subject), question.strip(), [o.strip() for o in options],
                          index, where)


def _labels(question: ChoiceQuestion) -> tuple[str, str, str]:
    """(question label, answer label, what goes before a continuation) in the question's language."""
    return ("问题：", "答案：", "") if _CJK.search(question.question) else ("Question: ", "Answer:", " ")


def choice_prompt(question: ChoiceQuestion, examples: Sequence[ChoiceQuestion] = (), scoring: str = "text") -> str:
    """The context the options are scored after: the examples answered, then the question."""
    ask, answer, space = _labels(question)

    def block(q: ChoiceQuestion) -> str:
        if scoring == "letter":
            listed = "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(q.options))
            return f"{q.question}{listed}\n{answer}"
        return f"{ask}{q.question}\n{answer}"

    shots = [block(q) + space + (LETTERS[q.answer] if scoring == "letter" else q.options[q.answer])
             for q in examples]
    return "\n\n".join(shots + [block(question)])


def choice_continuations(question: ChoiceQuestion, scoring: str = "text") -> list[str]:
    _, _, space = _labels(question)
    return [space + (LETTERS[i] if scoring == "letter" else o) for i, o in enumerate(question.options)]


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                          progress: Progress | None = None) -> list[float]:
    """Summed log-probability of each continuation after its context, for (context ids, continuation
    ids) pairs; rows of similar length share a (right-padded) forward pass. A context too long for the
    model keeps its end."""
    device = next(model.parameters()).device
    limit, pad = model.config.max_position_embeddings, model.config.pad_token_id
    sequences = []
    for context, continuation in pairs:
        if not context or not continuation or len(continuation) >= limit:
            raise ValueError(f"need a context and a continuation shorter than {limit} tokens, got "
                             f"{len(context)} and {len(continuation)}")
        sequences.append((list(context) + list(continuation))[-limit:])
    order = sorted(range(len(pairs)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = torch.full((len(rows), len(sequences[rows[0]])), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
        logits = model(ids.to(device)).logits
        for r, i in enumerate(rows):
            end, n = len(sequences[i]), len(pairs[i][1])
            logps = logits[r, end - n - 1:end - 1].float().log_softmax(-1)
            targets = ids[r, end - n:end].to(device)
            scores[i] = logps.gather(-1, targets[:, None]).sum().item()
        if progress is not None:
            progress(len(rows))
    model.train(was_training)
    return scores


def choice_accuracy(model, tokenizer, questions: Sequence[ChoiceQuestion], shots: int = 0, batch_size: int = 16,
                    scoring: str = "text", progress: Progress | None = None) -> dict:
    """Share of questions whose best-scored option is the answer, overall (per question), averaged over
    subjects (macro), and per subject. Text scoring divides each option's log-probability by its
    UTF-8 bytes; letter scoring compares the letters' log-probabilities as they are."""
    if scoring not in ("text", "letter"):
        raise ValueError(f"scoring must be 'text' or 'letter', got {scoring!r}")
    by_subject: dict[str, list[ChoiceQuestion]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    pairs, spans = [], []
    for q in questions:
        examples = [other for other in by_subject[q.subject] if other is not q][:shots]
        context = tokenizer.encode(choice_prompt(q, examples, scoring))
        continuations = choice_continuations(q, scoring)
        spans.append((len(pairs), len(continuations)))
        pairs += [(context, tokenizer.encode(c)) for c in continuations]
    scores = continuation_logprobs(model, pairs, batch_size, progress)
    subjects: dict[str, dict] = {}
    predictions = []
    for q, (start, n) in zip(questions, spans):
        option_scores = scores[start:start + n]
        if scoring == "text":
            option_scores = [s / max(1, len(o.encode("utf-8"))) for s, o in zip(option_scores, q.options)]
        predicted = max(range(n), key=option_scores.__getitem__)
        entry = subjects.setdefault(q.subject, {"correct": 0, "questions": 0})
        entry["correct"] += predicted == q.answer
        entry["questions"] += 1
        predictions.append({"where": q.where, "subject": q.subject, "answer": LETTERS[q.answer],
                            "predicted": LETTERS[predicted]})
    for entry in subjects.values():
        entry["accuracy"] = entry["correct"] / entry["questions"]
    correct = sum(e["correct"] for e in subjects.values())
    return {"accuracy": correct / len(questions), "macro_accuracy": sum(e["accuracy"] for e in subjects.values())
            / len(subjects), "correct": correct, "questions": len(questions), "shots": shots, "scoring": scoring,
            "subjects": dict(sorted(subjects.items())), "predictions": predictions}


# ----------------------------------------------------------------------------------------------
# Generated answers checked against ground truth


def _question(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _batches(items: Sequence, batch_size: int, params: SamplingParams):
    """(batch, its sampling params): with a fixed seed each batch gets its own, reproducible, stream."""
    for i, start in enumerate(range(0, len(items), batch_size)):
        yield items[start:start + batch_size], (params if params.seed is None else
                                                dataclasses.replace(params, seed=params.seed + i))


def answer_accuracy(model, tokenizer, records: Sequence[tuple[str, dict]], reward: str = "math",
                    params: SamplingParams | None = None, batch_size: int = 16, thinking: bool = False,
                    progress: Progress | None = None) -> dict:
    """Answer RL-format prompts (`(where, record)` pairs, each record with `conversations` and `gt`) in
    batches and score each reply with rewards.math_reward or exact_reward. A case is correct when its
    reward is 1 (for a list gt: every item found); `mean_reward` also credits partial answers."""
    score = {"math": math_reward, "exact": exact_reward}.get(reward)
    if score is None:
        raise ValueError(f"reward must be 'math' or 'exact', got {reward!r}")
    params = params or SamplingParams()
    limit = model.config.max_position_embeddings
    cases, prompts = [], []
    for where, record in records:
        try:  # as read from an RL file: validated, its placeholder for the reply dropped
            record = check_record(record, "rl")
        except BadRecord as error:
            raise DataError(f"{where}: {error}") from None
        if record.get("gt") is None:
            raise DataError(f"{where}: no 'gt' to check the answer against")
        messages = record["conversations"]
        text = tokenizer.apply_chat_template(messages, tools=conversation_tools(messages), add_generation_prompt=True,
                                             open_thinking=thinking)
        ids = tokenizer.encode(text)
        if len(ids) + params.max_new_tokens > limit:
            raise DataError(f"{where}: {len(ids)} prompt tokens + --max-new-tokens {params.max_new_tokens} exceed "
                            f"the model's context of {limit}")
        prompts.append((text, ids))
    for batch, batch_params in _batches(list(zip(records, prompts)), batch_size, params):
        completions = generate(model, tokenizer, [ids for _, (_, ids) in batch], batch_params)
        for ((where, record), (text, _)), completion in zip(batch, completions):
            value = score(text, completion.text, record)
            answer = extract_final_answer(completion.text) if reward == "math" else answer_text(completion.text)
            cases.append({"where": where, "question": _question(record["conversations"]), "gt": record["gt"],
                          "reply": completion.text, "answer": answer, "reward": value, "correct": value == 1.0,
                          "finish_reason": completion.finish_reason})
        if progress is not None:
            progress(len(batch))
    n = max(len(cases), 1)
    return {"accuracy": sum(c["correct"] for c in cases) / n, "mean_reward": sum(c["reward"] for c in cases) / n,
            "correct": sum(c["correct"] for c in cases), "cases": len(cases), "reward": reward,
            "length_limited": sum(c["finish_reason"] == "length" for c in cases), "details": cases}


# ----------------------------------------------------------------------------------------------
# Tool use


TOOL_CRITERIA = ("right_tools", "valid_arguments", "call_count", "final_answer", "all")


def _result_has(result: str, expected: str) -> bool:
    """Whether a tool message holds the expected value: one of its JSON values, compared as numbers
    when both are numbers, else as text ignoring case."""
    try:
        parsed = json.loads(result)
    except json.JSONDecodeError:
        parsed = result
    values, stack = [], [parsed]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += value.values()
        elif isinstance(value, list):
            stack += value
        elif value is not None:
            values.append(str(value))
    return any(numbers_equal(v, expected) or v.strip().casefold() == expected.strip().casefold() for v in values)


def score_tool_case(trajectory: Trajectory, gt) -> dict:
    """The criteria of one agent case, with `gt` listing one expected value per tool call (the
    curriculum's and MiniMind's agent data):

    right_tools      every gt value is in the result of its own successful call (so the right tool was
                     called with the right arguments)
    valid_arguments  at least one call, and every call well formed with arguments fitting the schema
    call_count       as many valid calls as gt values and no invalid one (MiniMind's alignment check)
    final_answer     the final answer holds every gt value, in order (rewards.math_reward == 1)
    all              all four
    """
    expected = [str(g) for g in gt] if isinstance(gt, (list, tuple)) else [str(gt)]
    unused = [r for call, r in zip(trajectory.tool_calls, trajectory.tool_results) if call.valid
              and "error" not in _json_keys(r)]
    matched = 0
    for value in expected:
        hit = next((i for i, r in enumerate(unused) if _result_has(r, value)), None)
        if hit is not None:
            unused.pop(hit)
            matched += 1
    criteria = {
        "right_tools": matched == len(expected),
        "valid_arguments": bool(trajectory.tool_calls) and trajectory.invalid_calls == 0,
        "call_count": trajectory.valid_calls == len(expected) and trajectory.invalid_calls == 0,
        "final_answer": math_reward("", trajectory.answer, {"gt": expected}) == 1.0,
    }
    criteria["all"] = all(criteria.values())
    return criteria


def _json_keys(text: str) -> set:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return set()
    return set(value) if isinstance(value, dict) else set()


def tool_use_accuracy(model, tokenizer, records: Sequence[tuple[str, dict]], tools=None,
                      params: SamplingParams | None = None, batch_size: int = 16, max_turns: int = 3,
                      thinking: bool = False, progress: Progress | None = None) -> dict:
    """Run agent records (`(where, record)` pairs with `conversations` and a `gt` list) through
    run_agents, `batch_size` conversations together, and score each case (score_tool_case). Returns the
    share of cases meeting each criterion, call statistics, and a per-case report."""
    tools = builtin_tools() if tools is None else list(tools)
    params = params or SamplingParams()
    cases = []
    for batch, batch_params in _batches(list(records), batch_size, params):
        trajectories = run_agents(model, tokenizer, [r["conversations"] for _, r in batch], tools, batch_params,
                                  max_turns=max_turns, thinking=thinking)
        for (where, record), t in zip(batch, trajectories):
            cases.append({
                "where": where, "question": _question(record["conversations"]), "gt": record["gt"],
                "calls": [{"name": c.name, "arguments": c.arguments, "valid": c.valid, "error": c.error,
                           "result": r} for c, r in zip(t.tool_calls, t.tool_results)],
                "answer": t.answer, "replies": t.replies, "end": t.end, "turns": len(t.replies),
                "criteria": score_tool_case(t, record["gt"])})
        if progress is not None:
            progress(len(batch))
    n = max(len(cases), 1)
    return {**{name: sum(c["criteria"][name] for c in cases) / n for name in TOOL_CRITERIA},
            "cases": len(cases), "finished": sum(c["end"] == "answer" for c in cases) / n,
            "mean_calls": sum(len(c["calls"]) for c in cases) / n,
            "invalid_calls": sum(not call["valid"] for c in cases for call in c["calls"]),
            "max_turns": max_turns, "details": cases}


# ----------------------------------------------------------------------------------------------
# Side-by-side chat


CHAT_PROMPTS = [
    "你好，请介绍一下你自己。",
    "Hello! Who are you?",
    "12 加 30 等于多少？",
    "What is 7 times 8?",
    "中国的首都是哪里？",
    "Name three colours.",
    "请用一句话描述春天。",
    "Tell me a short story about a cat.",
]


def read_chat_prompts(paths, skip_bad: bool = False) -> list[tuple[str, list[dict]]]:
    """(where, messages) per prompt: a .txt file holds one user message per line; JSONL holds
    conversations (SFT or RL format: a trailing assistant turn is dropped)."""
    prompts = []
    for path in map(Path, paths):
        if path.suffix == ".txt":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such prompt file")
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts += [(f"{path}:{i}", [{"role": "user", "content": line.strip()}])
                        for i, line in enumerate(lines, start=1) if line.strip()]
        else:
            prompts += [(f"{file}:{line}", record["conversations"])
                        for file, line, record in read_records([path], "rl", skip_bad, BadLines())]
    return prompts


def chat_answers(model, tokenizer, conversations: Sequence[list[dict]], params: SamplingParams | None = None,
                 batch_size: int = 16, thinking: bool = False, progress: Progress | None = None) -> list[str]:
    """Each conversation's next assistant reply (the raw text, reasoning included), decoded in batches."""
    params = params or SamplingParams()
    replies = []
    for batch, batch_params in _batches(list(conversations), batch_size, params):
        prompts = [tokenizer.apply_chat_template(m, tools=conversation_tools(m), add_generation_prompt=True,
                                                 open_thinking=thinking) for m in batch]
        replies += [c.text for c in generate(model, tokenizer, prompts, batch_params)]
        if progress is not None:
            progress(len(batch))
    return replies


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(text: str, width: int) -> str:
    """`text` on one line, cut or padded to `width` terminal columns (Chinese characters take two)."""
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    if _width(text) > width:
        while _width(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - _width(text))


def chat_table(prompts: Sequence[str], names: Sequence[str], answers: dict[str, list[str]], width: int = 36) -> str:
    """A text table: one row per prompt, one column per model, each answer cut to `width` columns."""
    header = [_cell("prompt", 28)] + [_cell(n, width) for n in names]
    lines = [" | ".join(header), "-+-".join("-" * _width(h) for h in header)]
    for i, prompt in enumerate(prompts):
        lines.append(" | ".join([_cell(prompt, 28)] + [_cell(answer_text(answers[n][i]), width) for n in names]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command


TASKS = ("loss", "choice", "math", "exact", "tools", "chat")


class ProgressLine:
    """`eval TASK: done/total unit` on stderr, rewritten in place on a terminal, else a line every 10 s."""

    def __init__(self, task: str, total: int | None, unit: str):
        self.task, self.total, self.unit = task, total, unit
        self.done, self.started, self.shown = 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty() and total is not None  # an open count gets plain lines

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        last = self.total is not None and self.done >= self.total
        if last or now - self.shown >= (0.5 if self.tty else 10.0):
            self.shown = now
            total = f"/{self.total}" if self.total is not None else ""
            rate = self.done / max(now - self.started, 1e-9)
            print(("\r" if self.tty else "") + f"eval {self.task}: {self.done}{total} {self.unit} ({rate:.1f}/s)",
                  end="\n" if last or not self.tty else "", file=sys.stderr, flush=True)


def detect_text_kind(path: Path) -> str:
    """"pretrain" or "sft", from the first record of a JSONL file (`text` or `conversations`)."""
    for line, record in _json_lines(path):
        if "_error" in record:
            raise DataError(f"{path}:{line}: {record['_error']}")
        if "text" in record:
            return "pretrain"
        if "conversations" in record:
            return "sft"
        raise DataError(f"{path}:{line}: --task loss reads pretraining text ({{\"text\": ...}}) or SFT "
                        "conversations ({\"conversations\": [...]})")
    raise DataError(f"{path}: the file is empty")


def main(args, load: Callable[[Path], tuple]) -> dict:
    """`nanomind eval`: run args.task, print a summary, write the results to args.out as JSON.
    `load(model_folder)` returns (model, tokenizer) with args' adapter, tokenizer, device and dtype."""
    task, models = args.task, list(args.model)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task != "chat" and len(models) > 1:
        raise ValueError(f"--task {task} evaluates one --model; only --task chat compares several")
    if task == "chat" and len(models) > 1 and args.adapter:
        raise ValueError("--adapter applies to a single --model")
    if task not in ("chat",) and not args.data:
        raise ValueError(f"--task {task} needs --data FILE")
    started = time.perf_counter()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    result = {"task": task, "model": str(models[0]) if len(models) == 1 else [str(m) for m in models],
              "adapter": str(args.adapter) if args.adapter else None,
              "data": [str(d) for d in args.data] if args.data else None}

    if task == "chat":
        prompts = (read_chat_prompts(args.data, args.skip_bad) if args.data else
                   [("built-in", [{"role": "user", "content": p}]) for p in CHAT_PROMPTS])[:args.limit]
        names = _model_names(models)
        answers = {}
        for name, folder in zip(names, models):
            model, tokenizer = load(folder)
            answers[name] = chat_answers(model, tokenizer, [m for _, m in prompts], params, args.batch_size,
                                         args.think, ProgressLine(f"chat {name}", len(prompts), "prompts"))
            del model
        questions = [_question(m) for _, m in prompts]
        result["rows"] = [{"where": where, "prompt": q, "answers": {n: answers[n][i] for n in names}}
                          for i, ((where, _), q) in enumerate(zip(prompts, questions))]
        summary = chat_table(questions, names, answers)
    else:
        model, tokenizer = load(models[0])
        if task == "loss":
            kind = detect_text_kind(args.data[0])
            metrics = held_out_loss(model, tokenizer, args.tokenizer or models[0], args.data, kind, args.seq_len,
                                    args.batch_size, args.limit, ProgressLine(task, None, "rows"))
            result.update(kind=kind, **metrics)
            summary = (f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  bits/byte "
                       f"{metrics['bits_per_byte']:.4f}  ({metrics['tokens']:,} scored tokens, {metrics['rows']} rows "
                       f"of {args.seq_len}, {kind})")
        elif task == "choice":
            questions = read_choice_questions(args.data)[:args.limit]
            n_pairs = sum(len(q.options) for q in questions)
            metrics = choice_accuracy(model, tokenizer, questions, args.shots, args.batch_size, args.choice_scoring,
                                      ProgressLine(task, n_pairs, "options"))
            result.update(metrics)
            lines = [f"  {s:30} {e['accuracy']:.3f} ({e['correct']}/{e['questions']})"
                     for s, e in metrics["subjects"].items()]
            lines.append(f"accuracy {metrics['accuracy']:.3f} ({metrics['correct']}/{metrics['questions']}), "
                         f"macro over {len(metrics['subjects'])} subjects {metrics['macro_accuracy']:.3f}; "
                         f"{args.shots}-shot, {args.choice_scoring} scoring")
            summary = "\n".join(lines)
        else:
            kind = "agent" if task == "tools" else "rl"
            bad = BadLines()
            records = [(f"{f}:{line}", r) for f, line, r in
                       itertools.islice(read_records(args.data, kind, args.skip_bad, bad), args.limit)]
            if not records:
                raise DataError(f"{', '.join(map(str, args.data))}: no records to evaluate")
            progress = ProgressLine(task, len(records), "cases")
            if task == "tools":
                tools = resolve_tools(args.tools)
                metrics = tool_use_accuracy(model, tokenizer, records, tools, params, args.batch_size,
                                            args.max_turns, args.think, progress)
                summary = (f"{metrics['cases']} cases: " + ", ".join(
                    f"{name.replace('_', ' ')} {metrics[name]:.3f}" for name in TOOL_CRITERIA)
                    + f"; finished {metrics['finished']:.3f}, {metrics['mean_calls']:.2f} calls per case, "
                      f"{metrics['invalid_calls']} invalid")
            else:
                metrics = answer_accuracy(model, tokenizer, records, task, params, args.batch_size, args.think,
                                          progress)
                summary = (f"accuracy {metrics['accuracy']:.3f} ({metrics['correct']}/{metrics['cases']}), mean "
                           f"reward {metrics['mean_reward']:.3f}; {metrics['length_limited']} replies stopped at "
                           f"--max-new-tokens {args.max_new_tokens}")
            if bad.total:
                metrics["skipped"] = bad.to_dict()
                summary += "\n" + bad.summary()
            result.update(metrics)
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(summary)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"results -> {out}")
    return result


def _model_names(folders: Sequence[Path]) -> list[str]:
    """Short, distinct names for the table: the folder names, or whole paths where those repeat."""
    names = [Path(f).name or str(f) for f in folders]
    names = [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
