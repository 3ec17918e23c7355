"""`nanomind chat`: talk to a checkpoint in the terminal.

Replies stream as they are decoded; the conversation is kept and sent back each turn. Commands:

  /reset          forget the conversation (the system prompt stays)
  /think          switch thinking on or off (the model writes its reasoning first, shown dimmed)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /exit           quit (Ctrl-D too)

A line ending in a backslash continues on the next line; a line holding only three double quotes
starts and ends a multi-line block. Ctrl-C stops the reply being written, not the program.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO

from .generation import SamplingParams, stream
from .reply_parser import ReplyParser

DIM, RESET = "\033[2m", "\033[0m"


class ChatSession:
    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None,
                 thinking: bool = False, out: TextIO = sys.stdout, color: bool = False):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system, self.thinking, self.out = system or None, thinking, out
        self.dim, self.reset_style = (DIM, RESET) if color else ("", "")
        self.messages: list[dict] = []

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages = []
            self._say("[conversation cleared]")
        elif name == "/think":
            self.thinking = not self.thinking
            self._say(f"[thinking {'on' if self.thinking else 'off'}]")
        elif name == "/system":
            self.system, self.messages = arg.strip() or None, []
            self._say(f"[system prompt {'set' if self.system else 'removed'}; conversation cleared]")
        else:
            self._say(f"[unknown command {name}; try /reset, /think, /system TEXT, /exit]")
        return True

    def reply(self, text: str) -> dict:
        """Stream the assistant's answer to `text`; Ctrl-C cuts it short. Returns the assistant message."""
        self.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        prompt = self.tokenizer.apply_chat_template(history, add_generation_prompt=True, open_thinking=self.thinking)
        parser = ReplyParser(self.thinking, parse_tools=False)
        message = {"role": "assistant", "content": "", "reasoning_content": ""}
        section = None
        pieces = stream(self.model, self.tokenizer, prompt, self.params)
        try:
            for piece in pieces:
                section = self._show(parser.push(piece), message, section)
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        self._show(parser.finish(), message, section)
        self.out.write(self.reset_style + ("\n[stopped]\n" if stopped else "\n"))
        self.out.flush()
        if not message["reasoning_content"]:
            del message["reasoning_content"]
        self.messages.append(message)
        return message

    def _show(self, events, message: dict, section: str | None) -> str | None:
        for kind, text in events:
            if kind != section:  # reasoning is shown dimmed, then a blank line before the answer
                self.out.write(self.dim if kind == "reasoning" else (self.reset_style + "\n\n" if section else ""))
                section = kind
            message["reasoning_content" if kind == "reasoning" else "content"] += text
            self.out.write(text)
        self.out.flush()
        return section

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def read_message(prompt: str = ">>> ") -> str | None:
    """One user message (None at end of input): backslash continues a line, \"\"\" opens a block."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                line = input("... ")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = input("... ")
        except EOFError:
            line = ""
    lines.append(line)
    return "\n".join(lines)


def run_chat(session: ChatSession) -> None:
    # A process started in the background by a non-interactive shell inherits SIGINT as "ignored",
    # and Python then never raises KeyboardInterrupt; chat promises that Ctrl-C stops a reply.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    session._say("nanomind chat: /reset, /think, /system TEXT, /exit; Ctrl-C stops a reply; "
                 "end a line with \\ or wrap lines in \"\"\" for several lines")
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            session._say("\n[use /exit or Ctrl-D to quit]")
            continue
        if text is None:
            break
        if not text.strip():
            continue
        if text.startswith("/"):
            if not session.command(text.strip()):
                break
            continue
        session.reply(text)
