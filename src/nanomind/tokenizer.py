"""Byte-level BPE tokenizer and chat template, laid out like MiniMind's so either loads in the other.

The tokenizer is HF `tokenizers` BPE over GPT-2 style byte-level pieces: every byte has a token, so any
text round-trips exactly and nothing is ever unknown. The first 36 ids are fixed control tokens
(`SPECIAL_TOKENS`): `<|endoftext|>` = 0 pads, `<|im_start|>` = 1 opens a turn, `<|im_end|>` = 2 ends
one. A saved folder also loads with `transformers.AutoTokenizer` and gives the same ids and the same
chat rendering.

The chat template (`chat_template.jinja`) renders this conversation

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 256 * 37?"},
     {"role": "assistant", "content": "", "reasoning_content": "Use the calculator.",
      "tool_calls": [{"name": "calculate", "arguments": {"expression": "256 * 37"}}]},
     {"role": "tool", "content": "9472"},
     {"role": "assistant", "content": "256 * 37 = 9472."}]

with `tools=[{"name": "calculate", "parameters": {...}}]` as (shortened where marked ...)

    <|im_start|>system
    Be brief.

    # Tools

    You may call the functions below. Their JSON signatures, one per line:
    <tools>
    {"name": "calculate", "parameters": {...}}
    </tools>

    To call one, answer with its name and arguments inside <tool_call></tool_call>:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call><|im_end|>
    <|im_start|>user
    What is 256 * 37?<|im_end|>
    <|im_start|>assistant
    <think>
    Use the calculator.
    </think>

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "256 * 37"}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    9472
    </tool_response><|im_end|>
    <|im_start|>assistant
    <think>

    </think>

    256 * 37 = 9472.<|im_end|>

and `add_generation_prompt=True` appends `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`, or
`<|im_start|>assistant\\n<think>\\n` with `open_thinking=True` (the model then writes its reasoning).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|buffer1|>", "<|buffer2|>", "<|buffer3|>", "<|buffer4|>", "<|buffer5|>",
    "<|buffer6|>", "<|buffer7|>", "<|buffer8|>", "<|buffer9|>",
]  # fmt: skip
# Ids below this are flagged special, so decode(skip_special_tokens=True) drops them. The tool and
# think tags (21-26) and the reserved buffers stay ordinary: they are part of what a chat model writes.
FIRST_NON_SPECIAL_ID = 21
PAD_TOKEN = UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
MODEL_MAX_LENGTH = 131072  # what MiniMind's tokenizer_config declares; the model config sets the real limit
SPECIAL_TOKEN_NAMES = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a visible character for each of the 256 byte values.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are moved up to
    U+0100 and beyond, in byte order, so a token never contains whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


# ---------------------------------------------------------------------------------------------------
# Training


# How text is cut into pieces before BPE merges within them. "qwen2" is Qwen2 / Qwen3's rule (the regex
# their tokenizer.json carries): every digit is a piece of its own, so numbers are spelled digit by digit
# and a small model can learn arithmetic column by column instead of memorising a token per number.
# "gpt2" is GPT-2's rule, which MiniMind's tokenizer uses: runs of digits are merged like words.
# The names are llama.cpp's (`tokenizer.ggml.pre`), which applies the same rule to a GGUF file.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("qwen2", "gpt2")


def _pre_tokenizer(name: str):
    if name == "qwen2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ValueError(f"unknown pre-tokenizer {name!r}; choose one of {', '.join(PRE_TOKENIZERS)}")


def _without_offsets(state):
    if isinstance(state, dict):
        return {k: _without_offsets(v) for k, v in state.items() if k != "trim_offsets"}
    return [_without_offsets(v) for v in state] if isinstance(state, list) else state


def train_tokenizer(
    files: Iterable[str | Path],
    vocab_size: int = 6400,
    out_dir: str | Path | None = None,
    *,
    pre_tokenizer: str = "qwen2",
    max_lines: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on JSONL or plain-text files, streaming them line by line.

    A JSONL line gives its `text`, or every `content` and `reasoning_content` of its `conversations`
    (pretraining and SFT files both work). A `.txt` file holds one document per line. Blank lines
    are skipped; `max_lines` stops after that many lines over all files together. `pre_tokenizer`
    is one of PRE_TOKENIZERS (see QWEN2_SPLIT_PATTERN).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and 256 bytes alone take "
                         f"{len(SPECIAL_TOKENS) + 256} ids")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre_tokenizer)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,  # listed first, so they get ids 0-35
        show_progress=show_progress,
    )
    # A generator, so files of any size stream through. Python is not the bottleneck here: reading and
    # parsing 50 MB of JSONL takes ~3 s, pre-tokenizing and computing merges in Rust takes the rest.
    tok.train_from_iterator(_training_texts(files, max_lines), trainer)
    tokenizer = Tokenizer(_with_special_flags(tok))
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _with_special_flags(tok: _HFTokenizer) -> _HFTokenizer:
    # BpeTrainer marks every token it is given as special; MiniMind keeps ids 21-35 ordinary.
    # Editing the serialized form is the one way that updates tokenizers' internal special set too.
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["id"] < FIRST_NON_SPECIAL_ID
    return _HFTokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _training_texts(files: Iterable[str | Path], max_lines: int | None) -> Iterator[str]:
    lines_read = 0
    for file in files:
        path = Path(file)
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if max_lines is not None and lines_read >= max_lines:
                    return
                lines_read += 1
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    yield line.rstrip("\r\n")
                else:
                    yield from _texts_of_record(line, f"{path}:{line_number}")


def _texts_of_record(line: str, where: str) -> list[str]:
    expected = 'each line must be {"text": "..."} or {"conversations": [{"role": ..., "content": ...}, ...]}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {expected}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}; {expected}")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' is a {type(record['text']).__name__}, not a string")
        return [record["text"]]
    if "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError(f"{where}: 'conversations' must be a list of message objects; {expected}")
        texts = (_text_of(m.get(key)) for m in conversation for key in ("content", "reasoning_content"))
        return [t for t in texts if t]
    raise ValueError(f"{where}: no 'text' or 'conversations' field (found {sorted(record)}); {expected}")


def _text_of(content) -> str:
    """Message content as plain text: a string, or the text parts of a multi-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


# ---------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat template that turns conversations into its input."""

    def __init__(self, hf_tokenizer: _HFTokenizer, chat_template: str | None = None):
        self.hf_tokenizer = hf_tokenizer
        self.chat_template = chat_template if chat_template is not None else packaged_chat_template()
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._required_id(PAD_TOKEN)
        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        self._token_bytes: list[bytes] | None = None  # built on first use

    def _required_id(self, token: str) -> int:
        token_id = self.hf_tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token; nanomind needs <|endoftext|>, <|im_start|> "
                             "and <|im_end|> (train one with train_tokenizer)")
        return token_id

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the chat template from a folder (ours, MiniMind's or a HF one).

        The template comes from `chat_template.jinja`, else `tokenizer_config.json["chat_template"]`,
        else the one packaged with nanomind.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a folder written by Tokenizer.save or "
                                    "train_tokenizer (or a MiniMind / Hugging Face tokenizer folder)")
        template = None
        config_path = directory / "tokenizer_config.json"
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif config_path.is_file():
            template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # transformers' form for several named templates
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(_HFTokenizer.from_file(str(path)), template)

    def save(self, directory: str | Path) -> Path:
        """Write the folder `Tokenizer.load` and `transformers.AutoTokenizer.from_pretrained` read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        added = sorted(self.hf_tokenizer.get_added_tokens_decoder().items())
        extra_special = [t.content for _, t in added if t.special and t.content not in SPECIAL_TOKEN_NAMES.values()]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **SPECIAL_TOKEN_NAMES,
            "additional_special_tokens": extra_special,
            "model_max_length": MODEL_MAX_LENGTH,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in added
            },
            "chat_template": self.chat_template,
        }
        _write_json(directory / "tokenizer_config.json", config)
        special_tokens_map = {**SPECIAL_TOKEN_NAMES, "additional_special_tokens": extra_special}
        _write_json(directory / "special_tokens_map.json", special_tokens_map)
        return directory

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; no BOS/EOS is added, and special-token strings become their ids."""
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, spread over all CPU cores by `tokenizers`."""
        return [e.ids for e in self.hf_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() each id, so a tensor or numpy array works as well as a list
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a piece of UTF-8, not always a whole character)."""
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        return self._token_bytes[token_id]

    def _build_token_bytes(self) -> list[bytes]:
        added = {i: t.content for i, t in self.hf_tokenizer.get_added_tokens_decoder().items()}
        table = []
        for i in range(self.vocab_size):
            if i in added:
                table.append(added[i].encode("utf-8"))
                continue
            piece = self.hf_tokenizer.id_to_token(i) or ""
            try:
                table.append(bytes(UNICODE_TO_BYTE[c] for c in piece))
            except KeyError:
                raise ValueError(f"token {i} ({piece!r}) is not a byte-level piece; token_bytes and "
                                 "stream_decoder need a byte-level BPE tokenizer") from None
        return table

    @property
    def pre_tokenizer_name(self) -> str | None:
        """"qwen2" or "gpt2" when the splitting rule is one of PRE_TOKENIZERS, else None.

        Only what decides the pieces is compared: `trim_offsets` (which real Qwen2 files set to false)
        changes reported character offsets, never the ids."""
        def rule(pre_tokenizer) -> str:
            return json.dumps(_without_offsets(json.loads(pre_tokenizer.__getstate__())), sort_keys=True)

        current = self.hf_tokenizer.pre_tokenizer
        if current is None:
            return None
        return next((name for name in PRE_TOKENIZERS if rule(_pre_tokenizer(name)) == rule(current)), None)

    def stream_decoder(self) -> StreamDecoder:
        """A decoder for generation: feed it ids one at a time, it hands back the text they complete."""
        return StreamDecoder(self)

    def fingerprint(self) -> str:
        """sha256 of what decides the token ids (vocabulary, merges, splitting rules) and the template.

        Data prepared with a tokenizer of another fingerprint must be prepared again.
        """
        # Only the parts of tokenizer.json that change encode()'s ids, as canonical JSON: transformers
        # adds a no-op post-processor when it re-saves a folder, and that must not look like a new tokenizer.
        data = json.loads(self.hf_tokenizer.to_str())
        keys = ("added_tokens", "normalizer", "pre_tokenizer", "model", "truncation", "padding")
        relevant = {key: data.get(key) for key in keys}
        canonical = json.dumps(relevant, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(f"{canonical}\0{self.chat_template}".encode("utf-8")).hexdigest()

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | str | None = None,
        add_generation_prompt: bool = False,
        open_thinking: bool | None = None,
        enable_thinking: bool | None = None,
        **kwargs,
    ) -> str:
        """Render a conversation to the text the model reads (same string as transformers renders).

        `tools`, and `tool_calls` on a message, may be JSON strings as MiniMind's datasets store
        them. `open_thinking=True` (alias `enable_thinking`) makes the generation prompt open a
        <think> block for the model to fill instead of closing it empty.
        """
        thinking = open_thinking if open_thinking is not None else enable_thinking
        if thinking is not None:
            # Pass both names so templates written for either (MiniMind's, Qwen3's) see the switch.
            kwargs.update(open_thinking=thinking, enable_thinking=thinking)
        context = {
            **SPECIAL_TOKEN_NAMES,  # transformers shows these to every template too
            **kwargs,
            "messages": [_prepare_message(m) for m in messages],
            "tools": _parse_if_json(tools, "tools"),
            "add_generation_prompt": add_generation_prompt,
        }
        return _compile_template(self.chat_template).render(context)


class StreamDecoder:
    """Turns a stream of token ids into text without ever emitting half a character.

    A Chinese character or an emoji is several UTF-8 bytes and byte-level BPE may split them across
    tokens; the incremental UTF-8 decoder keeps the incomplete tail until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------------
# Chat template helpers


def packaged_chat_template() -> str:
    return resources.files("nanomind").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Same as transformers' filter: plain json.dumps, non-ASCII kept (Jinja's own escapes HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    # The environment transformers renders chat templates in; matching it keeps the output identical.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _prepare_message(message: dict) -> dict:
    message = dict(message)
    if "tool_calls" in message:
        message["tool_calls"] = _parse_if_json(message["tool_calls"], "tool_calls")
    if message.get("reasoning_content") is None:
        # transformers accepts these older names for the reasoning; so do we, to render the same.
        for older_name in ("thinking", "reasoning"):
            if message.get(older_name) is not None:
                message["reasoning_content"] = message[older_name]
                break
    return message


def _parse_if_json(value, name: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is a string but not JSON ({e.msg} at column {e.colno}): {value[:80]!r}") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
