"""Multi-turn tool use: many conversations, each turn decoded together, tools run between turns.

    trajectories = run_agents(model, tokenizer, [messages, ...], builtin_tools(), SamplingParams())

Each turn, every conversation still going is continued in ONE `generate` batch (left-padded, KV-cached).
A reply is split into reasoning, text and `<tool_call>` blocks; each call is run (`run_tool_call`: a
malformed one comes back as `{"error": ...}`, nothing raises), the assistant message (with its
`tool_calls`) and one `tool` message per call are appended, and the conversation goes on to the next turn.
A reply without calls ends its conversation; so does `max_turns`, a reply cut off at `max_new_tokens`,
or a context too full for another reply.

The token ids of a trajectory are exactly what the model read and wrote, in order: the rendered prompt,
each reply's sampled tokens plus the end-of-turn token that stopped it, and between replies the text
the chat template puts there (the end of the assistant turn, the tool results as a user turn, the next
generation prompt). That text is found by rendering the conversation with and without the new tool
messages and taking the difference, so it is the template's own; the model's replies are never
re-tokenized. `mask` is 1 on the sampled tokens and 0 elsewhere: what an RL loss trains on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from .data import conversation_tools, without_reply_placeholder
from .generation import SamplingParams, generate
from .rewards import answer_text
from .tools import THINK_END, THINK_START, ToolCall, extract_tool_calls, run_tool_call, tool_schemas


@dataclass
class Trajectory:
    messages: list[dict]  # the conversation so far: the input, then assistant and tool messages
    thinking: bool = False  # whether the generation prompts opened a <think> block
    token_ids: list[int] = field(default_factory=list)  # everything the model read and wrote
    mask: list[int] = field(default_factory=list)  # 1 on the tokens the model sampled, 0 elsewhere
    prompt_length: int = 0  # tokens of the first prompt
    replies: list[str] = field(default_factory=list)  # the raw text of each reply
    finish_reasons: list[str] = field(default_factory=list)  # per reply: "stop" (end of turn) or "length"
    tool_calls: list[ToolCall] = field(default_factory=list)  # every call, in order, valid or not
    tool_results: list[str] = field(default_factory=list)  # the tool message of each call
    answer: str = ""  # the last reply without reasoning and tool calls
    end: str | None = None  # why it stopped: "answer", "max_turns", "length" or "context"

    @property
    def valid_calls(self) -> int:
        return sum(call.valid for call in self.tool_calls)

    @property
    def invalid_calls(self) -> int:
        return len(self.tool_calls) - self.valid_calls

    @property
    def finished(self) -> bool:
        """The model ended with a reply that calls no tool (not cut off by a limit)."""
        return self.end == "answer"


def split_reply(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, the rest) of a reply. With thinking on, the prompt opened <think>, so a reply that
    never closes it is all reasoning."""
    if THINK_END in text:
        reasoning, rest = text.split(THINK_END, 1)
        return reasoning.replace(THINK_START, "").strip(), rest
    return (text.strip(), "") if thinking else ("", text)


def assistant_turn(text: str, thinking: bool, calls: list[ToolCall]) -> dict:
    """The assistant message of a reply: its text, reasoning and the calls that have a name and arguments
    (a call too malformed for that shows up only as its error in the tool message)."""
    reasoning, rest = split_reply(text, thinking)
    message = {"role": "assistant", "content": answer_text(rest)}
    if reasoning:
        message["reasoning_content"] = reasoning
    named = [{"name": c.name, "arguments": c.arguments} for c in calls if c.name and isinstance(c.arguments, dict)]
    if named:
        message["tool_calls"] = named
    return message


def run_agents(model, tokenizer, conversations: Sequence[list[dict]], tools, params: SamplingParams | None = None,
               max_turns: int = 3, thinking: bool | Sequence[bool] = False,
               max_length: int | None = None) -> list[Trajectory]:
    """Continue every conversation for up to `max_turns` replies, running the tools it calls.

    `tools` are the Tool objects that can run (`builtin_tools()`, `load_tools(path)`); the prompt lists the
    tools a conversation carries on its system message (as MiniMind's agent data does), else these.
    A trailing empty assistant message (an RL record's placeholder) is dropped. `thinking` is one switch
    for all, or one per conversation. With a `params.seed`, turn t samples with seed + t. `max_length`
    caps a trajectory below the model's context: one without room for another reply ends ("context").
    """
    params = params or SamplingParams()
    if params.stop:
        raise ValueError("run_agents ends a reply at the end-of-turn token; stop strings are not supported")
    if params.eos_ids is not None and list(params.eos_ids) != [tokenizer.eos_id]:
        raise ValueError(f"run_agents ends a reply at the end-of-turn token {tokenizer.eos_id} only; got eos_ids "
                         f"{list(params.eos_ids)}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    params = dataclasses.replace(params, eos_ids=[tokenizer.eos_id])
    tools = list(tools)
    switches = [thinking] * len(conversations) if isinstance(thinking, bool) else list(thinking)
    if len(switches) != len(conversations):
        raise ValueError(f"got {len(switches)} thinking switches for {len(conversations)} conversations")

    trajectories = []
    for messages, think in zip(conversations, switches):
        messages = [dict(m) for m in without_reply_placeholder(messages)]
        t = Trajectory(messages, think)
        t.token_ids = tokenizer.encode(_render(tokenizer, t, tools, add_generation_prompt=True))
        t.mask = [0] * len(t.token_ids)
        t.prompt_length = len(t.token_ids)
        trajectories.append(t)

    context = min(model.config.max_position_embeddings, max_length or model.config.max_position_embeddings)
    for turn in range(max_turns):
        for t in trajectories:
            if t.end is None and len(t.token_ids) + params.max_new_tokens > context:
                t.end = "context"
        active = [t for t in trajectories if t.end is None]
        if not active:
            break
        turn_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + turn)
        completions = generate(model, tokenizer, [t.token_ids for t in active], turn_params)
        for t, completion in zip(active, completions):
            _take_reply(t, completion, tokenizer, tools, last_turn=turn + 1 == max_turns)
    return trajectories


def _take_reply(t: Trajectory, completion, tokenizer, tools, last_turn: bool) -> None:
    """Append one reply to a trajectory, run its calls, and either end it or add what the model reads next."""
    ended = completion.finish_reason == "stop"
    sampled = list(completion.token_ids) + ([tokenizer.eos_id] if ended else [])
    t.token_ids += sampled
    t.mask += [1] * len(sampled)
    t.replies.append(completion.text)
    t.finish_reasons.append(completion.finish_reason)
    _, rest = split_reply(completion.text, t.thinking)
    calls = extract_tool_calls(rest, tools)
    results = [run_tool_call(call, tools) for call in calls]
    t.tool_calls += calls
    t.tool_results += results
    t.answer = answer_text(rest)
    t.messages.append(assistant_turn(completion.text, t.thinking, calls))
    t.messages += [{"role": "tool", "content": r} for r in results]
    if not ended:
        t.end = "length"
    elif not calls:
        t.end = "answer"
    elif last_turn:
        t.end = "max_turns"
    if t.end is not None:
        return
    before = _render(tokenizer, Trajectory(t.messages[:-len(results)], t.thinking), tools)
    after = _render(tokenizer, t, tools, add_generation_prompt=True)
    end_of_turn = tokenizer.decode([tokenizer.eos_id])
    at = before.rfind(end_of_turn)
    if at < 0 or not after.startswith(before):
        raise ValueError("the chat template does not render tool results as a continuation of the conversation "
                         f"(or ends an assistant turn without {end_of_turn!r}); run_agents needs one that does")
    observation = tokenizer.encode(after[at + len(end_of_turn):])
    t.token_ids += observation
    t.mask += [0] * len(observation)


def _render(tokenizer, t: Trajectory, tools, add_generation_prompt: bool = False) -> str:
    offered = conversation_tools(t.messages) or tool_schemas(tools)
    return tokenizer.apply_chat_template(t.messages, tools=offered, add_generation_prompt=add_generation_prompt,
                                         open_thinking=t.thinking)
