"""Reading MiniMind's JSONL datasets: every line parsed and checked, nothing dropped silently.

Kinds and their line formats (MiniMind's, so its files work unchanged):
  pretrain   {"text": "..."}
  sft        {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": "...",
                                 optional "reasoning_content", "tools", "tool_calls"}, ...]}
  dpo        {"chosen": [messages], "rejected": [messages]}
  rl         {"conversations": [..., {"role": "assistant", "content": <placeholder>}]}, optional "gt"
  agent      the rl format plus a required "gt"

`tools` and `tool_calls` may be JSON strings (as MiniMind stores them) or lists; they come out as
lists. Strict by default: the first bad line raises DataError naming file:line and what is wrong.
With `skip_bad`, bad lines are counted per reason in a `BadLines` report instead.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("pretrain", "sft", "dpo", "rl", "agent")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A line of a data file is not what its kind requires; the message says file:line and why."""


class BadRecord(ValueError):
    """Raised by the validators; `reason` is a short category for the skipped-lines report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class BadLines:
    """What `--skip-bad` skipped: counts per reason and the first few file:line examples of each."""

    max_examples: int = 3
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, where: str, error: BadRecord) -> None:
        self.counts[error.reason] += 1
        if len(self.examples[error.reason]) < self.max_examples:
            self.examples[error.reason].append(f"{where}: {error}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad lines"
        lines = [f"skipped {self.total} bad line(s):"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {count} x {reason}, e.g.")
            lines += [f"      {example}" for example in self.examples[reason]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": dict(self.examples)}


# ----------------------------------------------------------------------------------------------
# Validation of one record


def _json_list(value, what: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{what} is not valid JSON", f"{e.msg} at column {e.colno}") from None
    if not isinstance(value, list):
        raise BadRecord(f"{what} is not a list", f"got {type(value).__name__}")
    return value


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRecord("bad content", f"{where} content must be a string or a list of text parts")


def check_messages(messages, what: str = "conversations") -> list[dict]:
    """Validate a message list and return normalised copies (content text, parsed tools / tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{what} is not a non-empty list", f"got {type(messages).__name__}")
    normalised = []
    for i, message in enumerate(messages):
        where = f"{what}[{i}]"
        if not isinstance(message, dict):
            raise BadRecord("message is not an object", f"{where} is a {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise BadRecord("unknown role", f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in message and not message.get("tool_calls"):
            raise BadRecord("missing key", f"{where} has no 'content'")
        m = {"role": role, "content": _content_text(message.get("content") or "", where)}
        if message.get("reasoning_content") is not None:
            if not isinstance(message["reasoning_content"], str):
                raise BadRecord("bad reasoning_content", f"{where} reasoning_content is not a string")
            m["reasoning_content"] = message["reasoning_content"]
        if message.get("tools"):
            m["tools"] = _json_list(message["tools"], f"{where} tools")
        if message.get("tool_calls"):
            calls = _json_list(message["tool_calls"], f"{where} tool_calls")
            for call in calls:
                function = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRecord("bad tool_calls", f"{where} tool call without a name: {call!r}")
            m["tool_calls"] = calls
        normalised.append(m)
    return normalised


def check_record(record, kind: str) -> dict:
    """Validate one parsed JSON line of the given kind and return it normalised."""
    if not isinstance(record, dict):
        raise BadRecord("line is not a JSON object", f"got {type(record).__name__}")
    if kind == "pretrain":
        text = record.get("text")
        if not isinstance(text, str):
            raise BadRecord("missing key" if text is None else "bad text",
                            "expected {\"text\": \"...\"}" if text is None else "'text' is not a string")
        if not text.strip():
            raise BadRecord("empty text", "'text' is empty")
        return {"text": text}
    if kind == "dpo":
        for side in ("chosen", "rejected"):
            if side not in record:
                raise BadRecord("missing key", f"expected 'chosen' and 'rejected', '{side}' is missing")
        pair = {side: check_messages(record[side], side) for side in ("chosen", "rejected")}
        for side, messages in pair.items():
            if messages[-1]["role"] != "assistant":
                raise BadRecord("no final assistant answer", f"the last message of '{side}' is not the assistant's")
        return pair
    if "conversations" not in record:
        raise BadRecord("missing key", "expected {\"conversations\": [...]}")
    messages = check_messages(record["conversations"])
    if kind == "sft":
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("no assistant turn", "an SFT conversation needs at least one assistant message")
        return {"conversations": messages}
    # rl / agent: the last assistant turn is a placeholder for the policy to fill; drop it.
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise BadRecord("no prompt", "an RL prompt must end with a user (or tool) message")
    out = {"conversations": messages}
    if "gt" in record:
        out["gt"] = record["gt"]
    elif kind == "agent":
        raise BadRecord("missing key", "an agent RL line needs 'gt' (the answer to verify)")
    return out


def conversation_tools(messages: list[dict]) -> list | None:
    """Tool definitions of a conversation: MiniMind keeps them on the system message."""
    for m in messages:
        if m.get("tools"):
            return m["tools"]
    return None


def without_reply_placeholder(messages: list[dict]) -> list[dict]:
    """The messages without a trailing empty assistant turn: the slot an RL record leaves for the reply."""
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and not last.get("content") and not last.get("tool_calls"):
        return messages[:-1]
    return messages


# ----------------------------------------------------------------------------------------------
# Streaming files


def read_records(paths, kind: str, skip_bad: bool = False,
                 bad_lines: BadLines | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield (file, line number, normalised record) from JSONL files, one line at a time.

    Blank lines are ignored. A bad line raises DataError, or with skip_bad is recorded in `bad_lines`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRecord("bad JSON", f"{e.msg} at column {e.colno}") from None
                    yield str(path), line_number, check_record(record, kind)
                except BadRecord as error:
                    if not skip_bad:
                        raise DataError(f"{path}:{line_number}: {error} (a {kind} line; pass --skip-bad "
                                        "to skip bad lines and get a report instead)") from None
                    if bad_lines is not None:
                        bad_lines.add(f"{path}:{line_number}", error)
