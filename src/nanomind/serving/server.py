"""An OpenAI-compatible HTTP server over the continuous-batching engine, and the web chat page.

  POST /v1/chat/completions   chat, streamed (SSE) or not; reasoning_content, tool_calls, n, usage
  POST /v1/completions        plain text continuation, streamed or not
  GET  /v1/models             the one model served
  GET  /health                liveness and load
  GET  /                      the chat page (static/index.html, no build step, no CDN)

Request bodies are checked by hand, field by field, so every mistake comes back as OpenAI's error
object naming the field (`{"error": {"message", "type", "param", "code"}}`) with status 400, never
as a traceback. Requests go to the engine thread; its updates come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import SamplingParams
from .engine import Engine, EngineRequest, EngineStopped, QueueFull
from ..reply_parser import ReplyParser

STATIC_DIR = Path(__file__).parent / "static"
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 1024
    # Sampling defaults when a request leaves a field out (from the checkpoint's generation_config.json).
    defaults: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})


class RequestError(Exception):
    """A request the server refuses; becomes OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# ----------------------------------------------------------------------------------------------
# Reading request fields


def _field(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a number field must not accept true/false
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, "
                                f"got {json.dumps(value)[:60]}", param=name)
    return value


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = _field(body, name, (int,) if integer else (int, float), default,
                   "an integer" if integer else "a number")
    if value is not None and not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def _text_of_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(400, f"{where}.content[{i}]: only text parts are supported "
                                        f"({{\"type\": \"text\", \"text\": ...}}), got {kind!r}", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def chat_messages(raw) -> list[dict]:
    """The request's `messages`, checked and reduced to what the chat template reads."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(400, f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}", param="messages")
        message = {"role": role, "content": _text_of_content(m.get("content"), where)}
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str):
                message["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list) or not all(
                        isinstance(c, dict) and isinstance(c.get("function", c).get("name"), str) for c in calls):
                    raise RequestError(400, f"{where}.tool_calls must be a list of "
                                            "{\"function\": {\"name\", \"arguments\"}} objects", param="messages")
                message["tool_calls"] = calls
        messages.append(message)
    return messages


def chat_tools(body: dict) -> tuple[list | None, str]:
    """The request's tools, and the text the reply is made to start with: `tool_choice` "required"
    or a named function opens the tool call in the prompt (in the template's own layout), so the
    model can only go on to write it; "auto" leaves the choice to the model, "none" hides the tools."""
    tools = _field(body, "tools", (list,), None, "a list of tools")
    choice = body.get("tool_choice", "auto")
    if not tools:
        if choice not in ("auto", "none", None):
            raise RequestError(400, "tool_choice needs 'tools'", param="tool_choice")
        return None, ""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                    "\"parameters\": ...}}}}", param="tools")
    if choice == "none":
        return None, ""
    if choice in ("auto", None):
        return tools, ""
    # The opening stops before a space: byte-level BPE attaches a space to the word after it, so
    # ending on one would hand the model a token split it never saw in training.
    if choice == "required":
        return tools, '<tool_call>\n{"name":'
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise RequestError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", '
                                '"function": {"name": ...}}', param="tool_choice")
    if name not in [tool["function"]["name"] for tool in tools]:
        raise RequestError(400, f"tool_choice names {name!r}, which is not among the request's tools",
                           param="tool_choice")
    return tools, '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments":'


def thinking_requested(body: dict) -> bool:
    kwargs = _field(body, "chat_template_kwargs", (dict,), {}, "an object")
    for source in (kwargs, body):
        for name in ("enable_thinking", "open_thinking"):
            if source.get(name) is not None:
                return bool(source[name])
    return False


def render_chat_prompt(tokenizer, messages: list[dict], tools: list | None, thinking: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                             open_thinking=thinking)
    except (TemplateError, ValueError) as e:
        raise RequestError(400, f"the chat template rejected the messages: {e}", param="messages") from None


# ----------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    tokenizer = engine.tokenizer
    context = engine.config.max_position_embeddings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()

    app = FastAPI(title="nanomind", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    @app.middleware("http")
    async def _check_api_key(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error_response(401, "missing or wrong API key: send the header "
                                           "'Authorization: Bearer <key>' with the server's --api-key",
                                      code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "nanomind"}]}

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- shared request handling --------------------------------------------------------------

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise RequestError(404, f"the model {model!r} does not exist; this server serves "
                                    f"{config.model_name!r} (see GET /v1/models)", param="model",
                               code="model_not_found")
        return body

    def sampling(body: dict, prompt_len: int) -> tuple[list[SamplingParams], float, float, bool, bool]:
        d = config.defaults
        temperature = _number(body, "temperature", d.get("temperature", 1.0), 0, 2)
        top_p = _number(body, "top_p", d.get("top_p", 1.0), 0, 1)
        if top_p == 0:
            raise RequestError(400, "'top_p' must be greater than 0", param="top_p")
        top_k = _number(body, "top_k", d.get("top_k", 0), -1, 1 << 30, integer=True)
        repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.01, 10)
        presence = _number(body, "presence_penalty", 0.0, -2, 2)
        frequency = _number(body, "frequency_penalty", 0.0, -2, 2)
        seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
        n = _number(body, "n", 1, 1, 16, integer=True)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, name, None, 1, 1 << 30, integer=True)
        if prompt_len >= context:
            raise RequestError(400, f"the prompt is {prompt_len} tokens; this model's context is {context} "
                                    "tokens: shorten the messages", param="messages",
                               code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(config.default_max_tokens, context - prompt_len)
        elif prompt_len + max_tokens > context:
            raise RequestError(400, f"this model's context is {context} tokens, but {prompt_len + max_tokens} "
                                    f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion): "
                                    f"lower '{name}' or shorten the prompt", param=name,
                               code="context_length_exceeded")
        stream = _field(body, "stream", (bool,), False, "true or false")
        options = _field(body, "stream_options", (dict,), {}, "an object")
        include_usage = bool(options.get("include_usage"))
        ignore_eos = _field(body, "ignore_eos", (bool,), False, "true or false")  # vLLM's extension
        params = [SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=max(top_k, 0), repetition_penalty=repetition_penalty,
                                 seed=None if seed is None else seed + i, stop=tuple(stop or ()),
                                 eos_ids=[] if ignore_eos else None)
                  for i in range(n)]
        return params, presence, frequency, stream, include_usage

    async def run_on_engine(request: Request, prompt_ids: list[int], params: list[SamplingParams],
                            presence: float, frequency: float):
        """Submit one engine request per choice; yield (index, piece, finish_reason, tokens) updates.

        Leaving the generator early (client gone, stream closed) cancels whatever is still running.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def sink(index):
            def on_update(piece, finish_reason, tokens):
                with contextlib.suppress(RuntimeError):  # the event loop is already closed
                    loop.call_soon_threadsafe(updates.put_nowait, (index, piece, finish_reason, tokens))
            return on_update

        submitted = []
        try:
            for i, p in enumerate(params):
                submitted.append(engine.submit(EngineRequest(prompt_ids, p, sink(i), presence, frequency)))
        except QueueFull as e:
            for r in submitted:
                r.cancel()
            raise RequestError(429, f"the server is busy: {e}", type="rate_limit_error",
                               code="queue_full") from None
        except EngineStopped as e:
            raise RequestError(503, str(e), type="server_error", code="unavailable") from None
        running = len(submitted)
        try:
            while running:
                try:
                    update = await asyncio.wait_for(updates.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if update[2] is not None:
                    running -= 1
                yield update
        finally:
            for r in submitted:
                r.cancel()

    def usage(prompt_len: int, tokens: dict[int, int]) -> dict:
        completion = sum(tokens.values())
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}

    def engine_failure(finish_reason: str) -> RequestError:
        if finish_reason == "cancelled":
            return RequestError(503, "the server is shutting down", type="server_error", code="unavailable")
        return RequestError(500, f"generation failed: {finish_reason.removeprefix('error: ')}",
                            type="server_error")

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_response(updates, chunks_of, usage_chunk, opening=()) -> StreamingResponse:
        """SSE: `opening`, then the chunks each engine update makes, the usage chunk, `[DONE]`.

        The requests are submitted before the response starts, so a full queue is still a 429 and
        not a broken stream; closing the stream (client gone) cancels them.
        """
        first = await first_update(updates)

        async def events():
            try:
                for line in opening:
                    yield line
                async for update in _chain([first] if first else [], updates):
                    if update[2] is not None and update[2] not in ("stop", "length"):
                        e = engine_failure(update[2])
                        yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                        break
                    for line in chunks_of(update):
                        yield line
                if usage_chunk is not None:
                    yield sse(usage_chunk())
                yield "data: [DONE]\n\n"
            finally:
                await updates.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- /v1/chat/completions -----------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = chat_messages(body.get("messages"))
        tools, forced = chat_tools(body)
        # A forced tool call starts the reply at once, so there is no room for reasoning first.
        thinking = thinking_requested(body) and not forced
        prompt_ids = tokenizer.encode(render_chat_prompt(tokenizer, messages, tools, thinking))
        prompt_ids += tokenizer.encode(forced) if forced else []
        params, presence, frequency, stream, include_usage = sampling(body, len(prompt_ids))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        parsers = [ReplyParser(thinking, parse_tools=tools is not None) for _ in params]
        for parser in parsers:
            parser.push(forced)  # the forced opening is part of the reply the parser reads (it emits nothing)
        updates = run_on_engine(request, prompt_ids, params, presence, frequency)

        def finish_reason_of(index: int, reason: str) -> str:
            return "tool_calls" if reason == "stop" and parsers[index].tool_calls else reason

        if not stream:
            replies = [{"content": "", "reasoning_content": "", "tool_calls": []} for _ in params]
            finish, tokens = {}, {}
            async for index, piece, reason, count in updates:
                events = parsers[index].push(piece) + (parsers[index].finish() if reason else [])
                for kind, value in events:
                    if kind == "tool_call":
                        replies[index]["tool_calls"].append(value)
                    else:
                        replies[index][f"{kind}_content" if kind == "reasoning" else kind] += value
                tokens[index] = count
                if reason is not None:
                    if reason not in ("stop", "length"):
                        raise engine_failure(reason)
                    finish[index] = finish_reason_of(index, reason)
            if len(finish) < len(params):  # the client went away
                return JSONResponse({}, status_code=499)
            choices = []
            for i, reply in enumerate(replies):
                message = {"role": "assistant", "content": reply["content"] or None}
                if thinking or reply["reasoning_content"]:
                    message["reasoning_content"] = reply["reasoning_content"]
                if reply["tool_calls"]:
                    message["tool_calls"] = [
                        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                        for call in reply["tool_calls"]]
                elif message["content"] is None:
                    message["content"] = ""
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish[i]})
            return {**base, "object": "chat.completion", "choices": choices,
                    "usage": usage(len(prompt_ids), tokens)}

        def chunk(index: int, delta: dict, finish_reason=None) -> str:
            data = {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                data["usage"] = None
            return sse(data)

        calls, tokens = [0] * len(params), {}

        def chunks_of(update) -> list[str]:
            index, piece, reason, count = update
            tokens[index] = count
            out = []
            for kind, value in parsers[index].push(piece) + (parsers[index].finish() if reason else []):
                if kind == "tool_call":
                    delta = {"tool_calls": [{"index": calls[index], "id": f"call_{uuid.uuid4().hex[:24]}",
                                             "type": "function", "function": value}]}
                    calls[index] += 1
                else:
                    delta = {"reasoning_content" if kind == "reasoning" else kind: value}
                out.append(chunk(index, delta))
            if reason is not None:
                out.append(chunk(index, {}, finish_reason_of(index, reason)))
            return out

        opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(params))]
        usage_chunk = lambda: {**base, "object": "chat.completion.chunk", "choices": [],  # noqa: E731
                               "usage": usage(len(prompt_ids), tokens)}
        return await stream_response(updates, chunks_of, usage_chunk if include_usage else None, opening)

    # -- /v1/completions ----------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt_ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                        and 0 <= t < engine.config.vocab_size for t in prompt):
            prompt_ids = prompt
        else:
            raise RequestError(400, "'prompt' must be a non-empty string (or a list of token ids); "
                                    "send several prompts as separate requests", param="prompt")
        params, presence, frequency, stream, include_usage = sampling(body, len(prompt_ids))
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        updates = run_on_engine(request, prompt_ids, params, presence, frequency)

        if not stream:
            texts, finish, tokens = [""] * len(params), {}, {}
            async for index, piece, reason, count in updates:
                texts[index] += piece
                tokens[index] = count
                if reason is not None:
                    if reason not in ("stop", "length"):
                        raise engine_failure(reason)
                    finish[index] = reason
            if len(finish) < len(params):
                return JSONResponse({}, status_code=499)
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": finish[i]}
                       for i, t in enumerate(texts)]
            return {**base, "object": "text_completion", "choices": choices, "usage": usage(len(prompt_ids), tokens)}

        tokens = {}

        def chunks_of(update) -> list[str]:
            index, piece, reason, count = update
            tokens[index] = count
            data = {**base, "object": "text_completion",
                    "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": reason}]}
            if include_usage:
                data["usage"] = None
            return [sse(data)]

        usage_chunk = lambda: {**base, "object": "text_completion", "choices": [],  # noqa: E731
                               "usage": usage(len(prompt_ids), tokens)}
        return await stream_response(updates, chunks_of, usage_chunk if include_usage else None)

    return app


async def first_update(updates):
    """The first update of a request (None if it ended without one); a submit error raises here."""
    try:
        return await updates.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: list, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item


# ----------------------------------------------------------------------------------------------
# Running it


def generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, as vLLM and transformers use them."""
    path = Path(model_dir) / "generation_config.json"
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("do_sample", True):
            defaults.update({k: saved[k] for k in defaults if isinstance(saved.get(k), (int, float))})
        else:
            defaults["temperature"] = 0.0
    return defaults


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8998, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 16, max_queue: int = 64, default_max_tokens: int = 1024,
          device: str = "cpu", dtype=None, tokenizer_dir: str | Path | None = None,
          adapter_dir: str | Path | None = None) -> None:
    import uvicorn

    from ..checkpoint import load_model
    from ..tokenizer import Tokenizer

    model_dir = Path(model_dir)
    model = load_model(model_dir, device=device, dtype=dtype)
    if adapter_dir is not None:
        from ..lora import load_adapter
        load_adapter(model, adapter_dir)
    tokenizer = Tokenizer.load(tokenizer_dir or model_dir)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue).start()
    config = ServerConfig(model_name=model_name or model_dir.resolve().name, api_key=api_key,
                          default_max_tokens=default_max_tokens, defaults=generation_defaults(model_dir))
    app = create_app(engine, config)
    print(f"nanomind serve: {config.model_name} ({model.num_parameters() / 1e6:.2f}M parameters, {device}) "
          f"on http://{host}:{port}  (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
