"""Multi-turn tool rollouts: tools run between turns, the mask marks exactly the model's tokens, batching
changes nothing, and nothing the model writes crashes the loop."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import random_model, tiny_config
from nanomind.agent import run_agents
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.generation import SamplingParams
from nanomind.tokenizer import train_tokenizer
from nanomind.tools import builtin_tools, tool_schemas


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = write_builtin_jsonl(tmp_path_factory.mktemp("text") / "text.jsonl", 300)
    return train_tokenizer([corpus], vocab_size=400)


class ScriptedModel(torch.nn.Module):
    """A stand-in for NanoMind whose greedy reply is `script(conversation text so far)`, written token by
    token through the real decoding loop (left padding, the KV cache object, EOS handling)."""

    def __init__(self, tokenizer, script):
        super().__init__()
        self.config = tiny_config(vocab_size=tokenizer.vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the loop a device and a dtype
        self.tokenizer, self.script = tokenizer, script

    def forward(self, ids, attention_mask=None, cache=None, last_logits_only=False):
        if not hasattr(cache, "replies"):  # the prefill: choose each row's reply from its prompt
            real = ids if attention_mask is None else [row[m.bool()] for row, m in zip(ids, attention_mask)]
            cache.replies = [self.tokenizer.encode(self.script(self.tokenizer.decode(r.tolist())))
                             + [self.tokenizer.eos_id] for r in real]
            cache.step = 0
        else:
            cache.step += 1
        logits = torch.full((len(ids), 1, self.config.vocab_size), -30.0)
        for row, reply in enumerate(cache.replies):
            logits[row, 0, reply[min(cache.step, len(reply) - 1)]] = 30.0
        return SimpleNamespace(logits=logits)


def call(expression: str) -> str:
    body = json.dumps({"name": "calculate_math", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


def agent_script(text: str) -> str:
    """A calculator user: calls the tool for "What is A * B?", then answers with what the tool said."""
    question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL).group(1)
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.DOTALL)
    if question.startswith("What is"):
        expression = question[len("What is "):-1]
        if not results:
            return call(expression)
        result = json.loads(results[-1])
        return f"{expression} = {result['result']}." if "result" in result else "The calculator refused."
    if question == "Wrong":  # the right call, then a wrong answer
        return call("12 * 3") if not results else "It is 5."
    if question == "Malformed":
        return '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": </tool_call>' if not results \
            else "Sorry."
    if question == "Loop":
        return call("1 + 1")
    return "Hello."


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": question},
            {"role": "assistant", "content": ""}]  # an RL record's placeholder: dropped


def test_a_tool_call_then_an_answer(tokenizer):
    model = ScriptedModel(tokenizer, agent_script)
    tools = builtin_tools()
    (t,) = run_agents(model, tokenizer, [conversation("What is 256 * 37?")], tools, SamplingParams(max_new_tokens=120))

    assert t.end == "answer" and t.finished and t.finish_reasons == ["stop", "stop"]
    assert [c.name for c in t.tool_calls] == ["calculate_math"] and t.valid_calls == 1 and t.invalid_calls == 0
    assert t.tool_results == ['{"result": "9472"}']
    assert t.answer == "256 * 37 = 9472."
    assert t.messages[-3] == {"role": "assistant", "content": "",
                              "tool_calls": [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]}
    assert t.messages[-2] == {"role": "tool", "content": '{"result": "9472"}'}
    assert t.messages[-1] == {"role": "assistant", "content": "256 * 37 = 9472."}

    # The mask by hand: the masked tokens are the two replies with their end-of-turn tokens, in two runs.
    masked = [i for i, m in zip(t.token_ids, t.mask) if m]
    assert tokenizer.decode(masked) == call("256 * 37") + "<|im_end|>" + "256 * 37 = 9472.<|im_end|>"
    runs = re.findall("1+", "".join(map(str, t.mask)))
    assert len(t.mask) == len(t.token_ids) and len(runs) == 2 and t.mask[-1] == 1
    # Unmasked: the prompt, then the tool result as a user turn and the next generation prompt.
    schemas = tool_schemas(tools)
    prompt = tokenizer.apply_chat_template(conversation("What is 256 * 37?")[:2], tools=schemas,
                                           add_generation_prompt=True)
    assert tokenizer.decode(t.token_ids[:t.prompt_length]) == prompt and t.mask[:t.prompt_length] == [0] * len(
        tokenizer.encode(prompt))
    between = tokenizer.decode([i for i, m in zip(t.token_ids[t.prompt_length:], t.mask[t.prompt_length:]) if not m])
    assert between == ('\n<|im_start|>user\n<tool_response>\n{"result": "9472"}\n</tool_response><|im_end|>\n'
                       '<|im_start|>assistant\n<think>\n\n</think>\n\n')
    # The whole trajectory is the template's rendering of the final conversation.
    assert tokenizer.decode(t.token_ids) + "\n" == tokenizer.apply_chat_template(t.messages, tools=schemas)


def test_malformed_calls_come_back_as_errors(tokenizer):
    model = ScriptedModel(tokenizer, agent_script)
    malformed, refused = run_agents(model, tokenizer, [conversation("Malformed"), conversation("What is 2 +?")],
                                    builtin_tools(), SamplingParams(max_new_tokens=120))
    assert malformed.invalid_calls == 1 and malformed.tool_calls[0].name is None
    assert "not valid JSON" in json.loads(malformed.tool_results[0])["error"]
    assert "tool_calls" not in malformed.messages[-3]  # nothing to render as a call
    assert malformed.messages[-2]["role"] == "tool" and "error" in json.loads(malformed.messages[-2]["content"])
    assert malformed.answer == "Sorry." and malformed.finished
    # A well-formed call the tool refuses: valid in form, its error is what the model reads next.
    assert refused.valid_calls == 1 and "not a valid arithmetic expression" in refused.tool_results[0]
    assert "<tool_response>\n" + refused.tool_results[0] in tokenizer.decode(refused.token_ids)


def test_turn_limit_context_limit_and_length_limit(tokenizer):
    model = ScriptedModel(tokenizer, agent_script)
    (looping,) = run_agents(model, tokenizer, [conversation("Loop")], builtin_tools(),
                            SamplingParams(max_new_tokens=120), max_turns=2)
    assert looping.end == "max_turns" and len(looping.replies) == 2 and len(looping.tool_calls) == 2
    assert looping.token_ids[-1] == tokenizer.eos_id and looping.mask[-1] == 1  # ends with its reply
    (cut,) = run_agents(model, tokenizer, [conversation("What is 256 * 37?")], builtin_tools(),
                        SamplingParams(max_new_tokens=5))
    assert cut.end == "length" and cut.finish_reasons == ["length"] and sum(cut.mask) == 5
    model.config.max_position_embeddings = cut.prompt_length + 130
    (full,) = run_agents(model, tokenizer, [conversation("What is 256 * 37?")], builtin_tools(),
                         SamplingParams(max_new_tokens=120))
    assert full.end == "context" and len(full.replies) == 1  # no room left for a second reply


def test_batched_rollouts_equal_one_at_a_time(tokenizer):
    questions = ["What is 256 * 37?", "Hi", "Loop", "Malformed", "What is 1234 - 5678?"]
    params = SamplingParams(max_new_tokens=120)
    model = ScriptedModel(tokenizer, agent_script)
    batched = run_agents(model, tokenizer, [conversation(q) for q in questions], builtin_tools(), params)
    assert [t.end for t in batched] == ["answer", "answer", "max_turns", "answer", "answer"]
    for question, t in zip(questions, batched):
        (alone,) = run_agents(model, tokenizer, [conversation(question)], builtin_tools(), params)
        assert (t.token_ids, t.mask, t.messages, t.answer) == (alone.token_ids, alone.mask, alone.messages,
                                                               alone.answer)

    # The same with a real (random) model and greedy decoding.
    real = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    params = SamplingParams(max_new_tokens=12)
    batched = run_agents(real, tokenizer, [conversation(q) for q in questions], builtin_tools(), params)
    for question, t in zip(questions, batched):
        (alone,) = run_agents(real, tokenizer, [conversation(question)], builtin_tools(), params)
        assert (t.token_ids, t.mask, t.replies) == (alone.token_ids, alone.mask, alone.replies)


def test_thinking_replies_keep_their_reasoning_apart(tokenizer):
    def thinker(text):
        results = re.findall(r"<tool_response>", text)
        return ("I need the calculator.\n</think>\n\n" + call("6 * 7")) if not results else "Done.\n</think>\n\n42."

    (t,) = run_agents(ScriptedModel(tokenizer, thinker), tokenizer, [conversation("Q")], builtin_tools(),
                      SamplingParams(max_new_tokens=120), thinking=True)
    assert t.tool_results == ['{"result": "42"}'] and t.answer == "42."
    assert t.messages[-3]["reasoning_content"] == "I need the calculator." and t.messages[-1]["content"] == "42."
    assert tokenizer.decode(t.token_ids).endswith("<|im_start|>assistant\n<think>\nDone.\n</think>\n\n42.<|im_end|>")
    assert tokenizer.decode(t.token_ids) + "\n" == tokenizer.apply_chat_template(
        t.messages, tools=tool_schemas(builtin_tools()))


def test_bad_settings_are_refused(tokenizer):
    model = ScriptedModel(tokenizer, agent_script)
    with pytest.raises(ValueError, match="stop strings"):
        run_agents(model, tokenizer, [conversation("Hi")], builtin_tools(), SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_turns"):
        run_agents(model, tokenizer, [conversation("Hi")], builtin_tools(), max_turns=0)
