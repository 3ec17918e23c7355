"""Split an assistant reply, as it streams, into reasoning, content and tool calls.

The chat template makes the model write

    <reasoning>\\n</think>\\n\\n<content>            (thinking on: the prompt already opened <think>)
    <content>                                        (thinking off: the prompt holds an empty block)

and a tool call anywhere in the content as

    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>

`ReplyParser.push(text)` returns the events that text completed: ("reasoning", str),
("content", str) or ("tool_call", {"name", "arguments"}). Tag text never leaves as content: a tail
that could be the start of a tag is held back until it is not. A tool call whose JSON does not parse
is passed through as content (so a reader still sees what the model wrote). The streaming and
non-streaming server paths both use this parser, so their texts are the same by construction.
"""

from __future__ import annotations

import json

THINK_END = "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    return max((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), default=0)


class ReplyParser:
    def __init__(self, thinking: bool, parse_tools: bool):
        self.section = "reasoning" if thinking else "content"
        self.parse_tools = parse_tools
        self.pending = ""  # received, not yet classified
        self.held_space = ""  # trailing whitespace of the section, sent only if more text follows
        self.started = {"reasoning": False, "content": False}
        self.tool_calls = 0

    def push(self, text: str) -> list[tuple[str, object]]:
        self.pending += text
        events: list[tuple[str, object]] = []
        while True:
            tag = {"reasoning": THINK_END, "content": TOOL_START if self.parse_tools else None,
                   "tool": TOOL_END}[self.section]
            at = self.pending.find(tag) if tag else -1
            if at < 0:
                if self.section != "tool":  # release all but a possible beginning of the tag
                    ready = len(self.pending) - (_partial_tag_length(self.pending, tag) if tag else 0)
                    self._emit(events, self.pending[:ready])
                    self.pending = self.pending[ready:]
                return events
            before, self.pending = self.pending[:at], self.pending[at + len(tag):]
            if self.section == "reasoning":
                self._emit(events, before)
                self._switch("content")
            elif self.section == "content":
                self._emit(events, before)
                self._switch("tool")
            else:
                self._switch("content")
                call = parse_tool_call(before)
                if call is None:
                    self._emit(events, TOOL_START + before + TOOL_END)
                else:
                    self.tool_calls += 1
                    events.append(("tool_call", call))

    def finish(self) -> list[tuple[str, object]]:
        """The reply ended: release what was held (an unclosed tool call becomes content)."""
        events: list[tuple[str, object]] = []
        rest = (TOOL_START if self.section == "tool" else "") + self.pending
        if self.section == "tool":
            self.section = "content"
        self.pending = ""
        if rest:
            self._emit(events, rest)
        if self.held_space and self.started[self.section]:
            events.append((self.section, self.held_space))
        self.held_space = ""
        return events

    def _switch(self, section: str) -> None:
        self.held_space = ""  # whitespace next to a tag is layout, not text
        self.section = section

    def _emit(self, events: list, text: str) -> None:
        if not self.started[self.section]:
            text = text.lstrip("\n")
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body):]
        if body:
            self.started[self.section] = True
            events.append((self.section, body))


def parse_tool_call(body: str) -> dict | None:
    """`{"name": ..., "arguments": {...}}` -> {"name", "arguments" (a JSON string)}, or None."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"name": call["name"], "arguments": arguments}
