"""The OpenAI-compatible server: a real `nanomind serve` process on a free port, spoken to by the
official `openai` client (and raw HTTP for malformed requests), plus the batching engine in-process.

Tool calls and thinking need a model that writes them. Random weights write arbitrary tokens, so
`scripted_checkpoint` trains a tiny model for a few seconds to memorise four replies to four exact
prompts (rendered by the server's own template code): a tool call, the answer after the tool result,
a reasoning + answer pair, and a count to twenty (a long, known text for max_tokens and stop). It
trains until greedy decoding reproduces every reply token for token, and fails loudly if it cannot,
so the server tests below always run against known replies instead of hoping for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.checkpoint import load_model, save_checkpoint
from nanomind.generation import SamplingParams, generate
from nanomind.model import NanoMind
from nanomind.tokenizer import Tokenizer, train_tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from nanomind.serving.engine import Engine, EngineRequest  # noqa: E402
from nanomind.serving.server import chat_messages, render_chat_prompt  # noqa: E402

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_CALL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOL_RESULT = "sunny, 21 C"
AFTER_TOOL_REPLY = "It is sunny in Paris."
SKY_QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
SKY_REASONING, SKY_ANSWER = "Air scatters blue light more.", "Because of Rayleigh scattering."
COUNT_QUESTION = [{"role": "user", "content": "Count to twenty."}]
COUNT_REPLY = " ".join(str(i) for i in range(1, 21))


def after_tool_messages(call_id: str = "call_0") -> list[dict]:
    return [*WEATHER_QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT}]


# (messages, tools, thinking, the exact text the model must write before <|im_end|>)
SCRIPT = [
    (WEATHER_QUESTION, [WEATHER_TOOL], False, TOOL_CALL_REPLY),
    (after_tool_messages(), [WEATHER_TOOL], False, AFTER_TOOL_REPLY),
    (SKY_QUESTION, None, True, f"{SKY_REASONING}\n</think>\n\n{SKY_ANSWER}"),
    (COUNT_QUESTION, None, False, COUNT_REPLY),
]


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scripted_checkpoint(root: Path) -> Path:
    """Train (once per test session) the tiny model that writes SCRIPT's replies; return its folder."""
    out = root / "scripted_model"
    if not (out / "config.json").exists():
        with one_torch_thread():
            _train_scripted_model(out, root)
    return out


def _train_scripted_model(out: Path, root: Path) -> None:
    # The tokenizer also learns the script's texts, so its prompts are a few dozen tokens, not hundreds.
    data = write_builtin_jsonl(root / "text.jsonl", 1000)
    renderer = train_tokenizer([data], vocab_size=300)  # only its chat template is used here
    rendered = [render_chat_prompt(renderer, chat_messages(m), tools, thinking) + reply
                for m, tools, thinking, reply in SCRIPT]
    with data.open("a", encoding="utf-8") as f:
        for text in rendered * 30:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tokenizer = train_tokenizer([data], vocab_size=1000)
    torch.manual_seed(0)
    model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048), verbose=False)
    sequences = []
    for messages, tools, thinking, reply in SCRIPT:
        prompt = tokenizer.encode(render_chat_prompt(tokenizer, chat_messages(messages), tools, thinking))
        target = tokenizer.encode(reply) + [tokenizer.eos_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * (len(prompt) - 1) + target])
        sequences.append((ids[:, :-1], labels, prompt, target))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(1, 801):
        loss = sum(model(ids, targets=labels).loss for ids, labels, _, _ in sequences)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 and loss.item() < 0.05:
            model.eval()
            params = SamplingParams(max_new_tokens=64, eos_ids=[])
            if all(generate(model, tokenizer, [p], params)[0].token_ids[:len(t)] == t for _, _, p, t in sequences):
                save_checkpoint(model, out, tokenizer=tokenizer)
                return
            model.train()
    raise AssertionError(f"the scripted model did not memorise its replies (loss {loss.item():.4f})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nanomind serve` in a subprocess, stopped at the end of the tests that use it."""

    def __init__(self, model_dir: Path, *flags, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nanomind.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--device", "cpu", *map(str, flags)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait_ready(self, timeout: float = 60) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nanomind serve exited early:\n{self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("nanomind serve did not answer /health in time")

    def stop(self) -> str:
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def servers(model_dir):
    """The main server, and a one-slot server with an API key (for 401 and 429), started together."""
    main = Server(model_dir, "--max-batch", 8, "--max-queue", 16, "--model-name", "nano")
    small = Server(model_dir, "--max-batch", 1, "--max-queue", 1, env={"NANOMIND_API_KEY": "secret-key"})
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        logs = [server.stop() for server in (main, small)]
    for log in logs:
        assert "Traceback" not in log, log  # no request ever hit an internal error


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same checkpoint in this process, decoded one prompt at a time by nanomind.generation."""
    return load_model(model_dir), Tokenizer.load(model_dir)


def chat(server, messages, **kwargs):
    return server.client().chat.completions.create(model="nano", messages=messages, temperature=0, **kwargs)


def stream_chat(server, messages, **kwargs):
    """Run a streamed chat; return the concatenated fields, tool-call deltas, finish reason, chunks."""
    chunks = list(server.client().chat.completions.create(model="nano", messages=messages, temperature=0,
                                                          stream=True, **kwargs))
    content = reasoning = ""
    tool_calls, finish = [], None
    for c in chunks:
        for choice in c.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            tool_calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return content, reasoning, tool_calls, finish, chunks


# ----------------------------------------------------------------------------------------------
# The engine, in-process


@one_torch_thread()
def test_engine_batched_rows_equal_each_request_alone(tmp_path):
    """Requests joining a running batch at different steps, with different lengths, stops and
    sampling settings, get exactly the tokens `generate` gives each alone."""
    tokenizer = train_tokenizer([write_builtin_jsonl(tmp_path / "text.jsonl", 500)], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    prompts = ["The colour of grass is", "3 plus", "小明和小狗去了公园，他们很开心。然后", "A",
               "Monday comes before Tuesday and after Sunday, so", "hi"]
    params = [SamplingParams(max_new_tokens=12 + 5 * i, eos_ids=[]) for i in range(len(prompts))]
    params[1] = SamplingParams(max_new_tokens=20, temperature=1.2, top_k=40, seed=7, eos_ids=[])
    params[3] = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.8, repetition_penalty=1.3, seed=3,
                               eos_ids=[])
    engine = Engine(model, tokenizer, max_batch=4)  # 6 requests, 4 slots: some wait for a free row
    texts, finished = [""] * len(prompts), [None] * len(prompts)
    done = threading.Semaphore(0)

    def on_update(i):
        def update(piece, finish_reason, tokens):
            texts[i] += piece
            if finish_reason:
                finished[i] = (finish_reason, tokens)
                done.release()
        return update

    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if i == 3:  # the first three are prefilled together, the others join a running batch
                engine.start()
            engine.submit(EngineRequest(tokenizer.encode(prompt), p, on_update(i)))
            time.sleep(0.003 * i)
        for _ in prompts:
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    assert engine.steps < sum(p.max_new_tokens for p in params)  # rows really shared forward passes
    for prompt, p, text, fin in zip(prompts, params, texts, finished):
        alone = generate(model, tokenizer, [prompt], p)[0]
        assert text == alone.text
        assert fin == ("length", p.max_new_tokens)


# ----------------------------------------------------------------------------------------------
# The HTTP API


def test_models_health_and_plain_completion(server, reference):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["nano"]
    assert server.health()["status"] == "ok"
    model, tokenizer = reference
    response = client.completions.create(model="nano", prompt="The colour of grass", max_tokens=12, temperature=0)
    alone = generate(model, tokenizer, ["The colour of grass"], SamplingParams(max_new_tokens=12))[0]
    assert response.object == "text_completion" and response.choices[0].text == alone.text
    assert response.usage.prompt_tokens == len(tokenizer.encode("The colour of grass"))


def test_chat_streamed_equals_not_streamed_with_usage(server, reference):
    _, tokenizer = reference
    response = chat(server, COUNT_QUESTION)
    message = response.choices[0].message
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert message.role == "assistant" and message.content == COUNT_REPLY and message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
    prompt = render_chat_prompt(tokenizer, COUNT_QUESTION, None, False)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == len(tokenizer.encode(COUNT_REPLY)) + 1  # + <|im_end|>
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    content, reasoning, _, finish, chunks = stream_chat(server, COUNT_QUESTION,
                                                        stream_options={"include_usage": True})
    assert content == COUNT_REPLY and finish == "stop" and reasoning == ""
    assert len(chunks) > 5 and all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == response.usage.model_dump()


def test_max_tokens_and_stop_in_both_modes(server):
    response = chat(server, COUNT_QUESTION, max_tokens=5)
    five = response.choices[0].message.content
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 5
    assert COUNT_REPLY.startswith(five) and len(five) < len(COUNT_REPLY)
    assert stream_chat(server, COUNT_QUESTION, max_completion_tokens=5)[::3] == (five, "length")

    response = chat(server, COUNT_QUESTION, stop=[" 5", "never"])
    assert response.choices[0].message.content == "1 2 3 4" and response.choices[0].finish_reason == "stop"
    content, _, _, finish, _ = stream_chat(server, COUNT_QUESTION, stop=" 5")
    assert (content, finish) == ("1 2 3 4", "stop")


def test_thinking_goes_to_reasoning_content(server):
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    message = chat(server, SKY_QUESTION, extra_body=on).choices[0].message
    assert message.model_extra["reasoning_content"] == SKY_REASONING and message.content == SKY_ANSWER
    content, reasoning, _, finish, _ = stream_chat(server, SKY_QUESTION, extra_body=on)
    assert (reasoning, content, finish) == (SKY_REASONING, SKY_ANSWER, "stop")

    off = chat(server, SKY_QUESTION, max_tokens=16).choices[0].message
    assert off.model_extra.get("reasoning_content") is None  # thinking off: everything is content


def test_tool_call_round_trip(server):
    response = chat(server, WEATHER_QUESTION, tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    content, _, deltas, finish, _ = stream_chat(server, WEATHER_QUESTION, tools=[WEATHER_TOOL])
    assert content == "" and finish == "tool_calls"  # the tag text never streams as content
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "get_weather", {"city": "Paris"})]

    history = [*WEATHER_QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}]
    answer = chat(server, history, tools=[WEATHER_TOOL]).choices[0]
    assert (answer.message.content, answer.finish_reason) == (AFTER_TOOL_REPLY, "stop")


def test_tool_choice_required_or_named_makes_the_reply_a_tool_call(server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        response = chat(server, WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=choice)
        assert response.choices[0].message.tool_calls, (choice, response.choices[0].message.content)
        (call,) = response.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert response.choices[0].finish_reason == "tool_calls"
        _, _, deltas, finish, _ = stream_chat(server, WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=choice)
        assert [d.function.name for d in deltas] == ["get_weather"] and finish == "tool_calls"
    # Even where the model would answer in words, a forced call starts the reply.
    forced = chat(server, COUNT_QUESTION, tools=[WEATHER_TOOL], tool_choice=named, max_tokens=24).choices[0]
    assert COUNT_REPLY not in (forced.message.content or "")
    assert forced.message.tool_calls or forced.message.content.startswith('<tool_call>\n{"name": "get_weather"')
    assert chat(server, WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="none").choices[0].message.tool_calls is None


@one_torch_thread()
def test_sixteen_concurrent_clients_get_their_own_answers(server, reference):
    """16 clients at once (8 decode together, 8 queue): greedy ones match `generate` alone, and
    seeded sampled ones match the same seed alone, whatever else shares the batch."""
    model, tokenizer = reference
    prompts = [f"{word} {i}" for i, word in enumerate(["The colour of", "3 plus 4", "小明和小狗", "Monday"] * 4)]
    results = [None] * len(prompts)

    def ask(i):
        sampled = i % 2 == 1
        results[i] = server.client().completions.create(
            model="nano", prompt=prompts[i], max_tokens=10 + i, temperature=0.9 if sampled else 0,
            top_p=0.95, seed=100 + i if sampled else None, extra_body={"top_k": 20})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(prompts):
        sampled = i % 2 == 1
        params = SamplingParams(max_new_tokens=10 + i, temperature=0.9 if sampled else 0, top_p=0.95, top_k=20,
                                seed=100 + i if sampled else None)
        assert results[i].choices[0].text == generate(model, tokenizer, [prompt], params)[0].text, prompts[i]


def test_n_choices_and_seeds(server):
    response = server.client().chat.completions.create(model="nano", messages=SKY_QUESTION, n=3, temperature=1.5,
                                                       seed=5, max_tokens=12)
    again = server.client().chat.completions.create(model="nano", messages=SKY_QUESTION, n=3, temperature=1.5,
                                                    seed=5, max_tokens=12)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [c.message.content for c in again.choices]
    assert 3 <= response.usage.completion_tokens <= 36  # counted over all choices


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param:
        assert error["param"] == param
    if code:
        assert error["code"] == code
    return error


def test_bad_requests_get_openai_errors(server):
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": "nano", "messages": COUNT_QUESTION, "max_tokens": 2}
    post = lambda body, **kw: httpx.post(url, json=body, timeout=30, **kw)  # noqa: E731
    assert_error(httpx.post(url, content=b"{not json", timeout=30), 400)
    assert_error(post([1, 2]), 400)
    assert_error(post({**ok, "messages": []}), 400, "messages")
    assert "'wizard'" in assert_error(post({**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400,
                                      "messages")["message"]
    assert_error(post({**ok, "temperature": "hot"}), 400, "temperature")
    assert_error(post({**ok, "temperature": 7}), 400, "temperature")
    assert_error(post({**ok, "max_tokens": 0}), 400, "max_tokens")
    assert_error(post({**ok, "stop": 5}), 400, "stop")
    assert_error(post({**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, "messages")
    long_prompt = [{"role": "user", "content": "天气 " * 3000}]
    assert_error(post({**ok, "messages": long_prompt}), 400, "messages", "context_length_exceeded")
    assert_error(post({**ok, "max_tokens": 5000}), 400, "max_tokens", "context_length_exceeded")
    assert_error(post({**ok, "model": "gpt-9"}), 404, "model", "model_not_found")
    assert_error(post({**ok, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                                      "function": {"name": "nope"}}}), 400, "tool_choice")
    assert_error(post({**ok, "tool_choice": "required"}), 400, "tool_choice")
    assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=30), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=COUNT_QUESTION)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="nano", prompt="", max_tokens=2)
    assert post(ok).status_code == 200 and server.health()["status"] == "ok"  # still serving


def test_api_key_and_full_queue(servers):
    _, small = servers
    url = f"{small.url}/v1/completions"
    body = {"prompt": "The colour of", "max_tokens": 800, "ignore_eos": True, "temperature": 0}
    assert_error(httpx.post(url, json=body, timeout=30), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    assert small.client("secret-key").models.list().data
    assert httpx.get(f"{small.url}/health", timeout=5).status_code == 200  # health needs no key

    # One slot and one queue place: of three long requests at once, at least one is refused.
    statuses = []

    def post():
        r = httpx.post(url, json=body, headers={"Authorization": "Bearer secret-key"}, timeout=120)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert_error(r, 429, code="queue_full")

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=120)
    assert 429 in statuses and statuses.count(200) >= 1, statuses


def test_client_disconnect_frees_its_slot(server):
    before = server.health()["cancelled"]
    body = {"model": "nano", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
        assert server.health()["running"] == 1
    deadline = time.time() + 5  # 2000 tokens take far longer than this: only a cancel frees the row
    while time.time() < deadline and server.health()["running"]:
        time.sleep(0.05)
    health = server.health()
    assert health["running"] == 0 and health["cancelled"] == before + 1
