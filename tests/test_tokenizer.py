"""Tokenizer and chat template: ids, round trips, streaming, MiniMind layout, transformers parity."""

import copy
import json

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanomind.builtin_text import builtin_conversations, builtin_documents, write_builtin_jsonl
from nanomind.tokenizer import BYTE_TO_UNICODE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

MIXED_TEXTS = [
    "Hello, world! 你好，世界！",
    "emoji 🤖🎉 and flags 🇨🇳 and a family 👨‍👩‍👧",
    "def add(a, b):\n\treturn a + b  # tab-indented\n\n    if x:\n        print('四个空格')\n",
    "  leading spaces, trailing newline\n",
    "<|im_start|>user\n问：1+1=？<|im_end|>\n<think>\n思考</think>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text_file = write_builtin_jsonl(root / "text.jsonl", 2000, seed=0)
    chat_file = root / "chat.jsonl"
    with chat_file.open("w", encoding="utf-8") as f:
        for conversation in builtin_conversations(300, seed=0):
            f.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
    train_tokenizer([text_file, chat_file], vocab_size=800, out_dir=root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_special_tokens_have_fixed_ids(tok):
    assert len(SPECIAL_TOKENS) == 36 and tok.vocab_size == 800
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
        assert tok.encode(token) == [i]
        assert tok.encode(f"a{token}b")[1:-1] == [i]  # never split, even inside text
    # ids 0-20 are dropped when skipping special tokens; think and tool tags are kept
    ids = tok.encode("<|im_start|>x<think>y</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>y</think>"


def test_round_trip_mixed_text(tok):
    for text in MIXED_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.encode_batch(MIXED_TEXTS) == [tok.encode(t) for t in MIXED_TEXTS]


def test_byte_alphabet_matches_tokenizers():
    assert sorted(BYTE_TO_UNICODE.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "猫🐱 and 🇨🇳 say 你好👋!"
    ids = tok.encode(text)
    # the test only means something if some characters really are split across tokens
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "" in pieces  # held back while a character was incomplete
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids) == text

    # a stream cut inside a character ends in one replacement character, as decode() gives
    cut = tok.encode("好")[:-1]
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in cut) + decoder.flush() == tok.decode(cut)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_transformers_encodes_identically(tok, hf_tok):
    assert len(hf_tok) == tok.vocab_size
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    for text in MIXED_TEXTS + builtin_documents(20, seed=3):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_numbers_are_split_into_digits_unless_gpt2_splitting_is_asked_for(tok, tmp_path):
    """The default (Qwen2's rule) gives every digit a token of its own, however the BPE merges went;
    GPT-2's rule (MiniMind's tokenizer) lets digit runs merge."""
    text = "In 2048, 17 of 365 days; 你好 12.5 + 7 = 19.5"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2048173651257195")
    assert tok.pre_tokenizer_name == "qwen2" and tok.decode(tok.encode(text)) == text
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("\n".join(f"{n} plus {n} is {2 * n}" for n in range(10, 400)), encoding="utf-8")
    gpt2 = train_tokenizer([numbers], vocab_size=600, pre_tokenizer="gpt2")
    assert gpt2.pre_tokenizer_name == "gpt2"
    assert any(len(gpt2.decode([i]).strip()) > 1 for i in gpt2.encode("120 plus 120 is 240"))


TOOLS = [
    {"type": "function", "function": {"name": "calculate", "description": "Evaluate arithmetic, e.g. 2 * (3 + 4).",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                     "required": ["expression"]}}},
    {"name": "weather", "description": "今天的天气", "parameters": {"type": "object", "properties": {}}},
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 256 * 37, and the weather?"},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "\nNeed both tools.\n",
     "tool_calls": [{"type": "function", "function": {"name": "calculate", "arguments": {"expression": "256 * 37"}}},
                    {"name": "weather", "arguments": "{}"}]},
    {"role": "tool", "content": '{"result": 9472}'},
    {"role": "tool", "content": "晴，25°C"},
    {"role": "assistant", "content": "<think>\nBoth answers are in.\n</think>\n\n256 * 37 = 9472; 晴天。"},
    {"role": "user", "content": [{"type": "text", "text": "Thanks! "}, {"type": "text", "text": "Bye."}]},
    {"role": "assistant", "content": "Bye!"},
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "OK?"},
]


def _with_json_strings(messages):
    """The same conversation the way MiniMind's datasets store it: tool_calls as JSON strings."""
    messages = copy.deepcopy(messages)
    for m in messages:
        if "tool_calls" in m:
            m["tool_calls"] = json.dumps(m["tool_calls"], ensure_ascii=False)
    return messages


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("prompt_kwargs", [
    {},
    {"add_generation_prompt": True},
    {"add_generation_prompt": True, "open_thinking": True},
    {"add_generation_prompt": True, "open_thinking": False},
    {"add_generation_prompt": True, "enable_thinking": True},
])
def test_transformers_renders_chat_identically(tok, hf_tok, tools, prompt_kwargs):
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        expected = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False, **prompt_kwargs)
        assert tok.apply_chat_template(messages, tools=tools, **prompt_kwargs) == expected
        tools_as_json = None if tools is None else json.dumps(tools, ensure_ascii=False)
        assert tok.apply_chat_template(_with_json_strings(messages), tools=tools_as_json, **prompt_kwargs) == expected


def test_chat_template_renders_expected_text(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "256 * 37?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the calculator.",
         "tool_calls": '[{"name": "calculate", "arguments": {"expression": "256 * 37"}}]'},
        {"role": "tool", "content": "9472"},
        {"role": "assistant", "content": "9472."},
    ]
    tools = '[{"name": "calculate", "parameters": {"type": "object"}}]'
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call the functions below. Their JSON signatures, one per line:\n"
        '<tools>\n{"name": "calculate", "parameters": {"type": "object"}}\n</tools>\n\n'
        "To call one, answer with its name and arguments inside <tool_call></tool_call>:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n256 * 37?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the calculator.\n</think>\n\n"
        '<tool_call>\n{"name": "calculate", "arguments": {"expression": "256 * 37"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n9472\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n9472.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tools=tools) == expected
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user\n256 * 37?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=True, open_thinking=True).endswith(
        "<|im_start|>assistant\n<think>\n")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        train_tokenizer([bad_json], vocab_size=400)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "fine"}\n{"prompt": "?"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: no 'text' or 'conversations' field"):
        train_tokenizer([no_field], vocab_size=400)


def test_trains_from_plain_text_and_respects_max_lines(tmp_path):
    docs = tmp_path / "docs.txt"
    lines = ["a .txt line is a document, not JSON {"] + builtin_documents(49, seed=1) + ["xylophone"] * 500
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(train_tokenizer([docs], vocab_size=400).encode("xylophone")) == 1
    limited = train_tokenizer([docs], vocab_size=400, max_lines=50)
    assert len(limited.encode("xylophone")) > 1  # never saw it
    assert limited.decode(limited.encode("星期一 Monday")) == "星期一 Monday"


def test_fingerprint_survives_save_and_load(tok, hf_tok, tmp_path):
    assert Tokenizer.load(tok.save(tmp_path / "ours")).fingerprint() == tok.fingerprint()
    hf_tok.save_pretrained(tmp_path / "transformers")
    assert Tokenizer.load(tmp_path / "transformers").fingerprint() == tok.fingerprint()
    assert Tokenizer(tok.hf_tokenizer, chat_template="{{ messages }}").fingerprint() != tok.fingerprint()


def _minimind_style_tokenizer() -> HFTokenizer:
    """A tokenizer.json laid out as MiniMind's: 36 added tokens, 256 bytes, BPE merges, ByteLevel."""
    symbols = [BYTE_TO_UNICODE[b] for b in range(256)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + symbols)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("ä", "½")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens([AddedToken(t, special=i < 21, normalized=False) for i, t in enumerate(SPECIAL_TOKENS)])
    return hf


def test_loads_minimind_style_folder(tmp_path, tok):
    _minimind_style_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)  # no template files: the packaged template is used
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (296, 0, 1, 2)
    assert loaded.encode("<|im_start|> the") == [1, 294]
    for text in MIXED_TEXTS:
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)

    # MiniMind keeps its template inside tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_builtin_text_is_deterministic_and_bilingual():
    docs = builtin_documents(50, seed=7)
    assert docs == builtin_documents(50, seed=7) != builtin_documents(50, seed=8)
    assert any("星期" in d or "等于" in d for d in docs) and any("equals" in d or "After" in d for d in docs)
    conversations = builtin_conversations(50, seed=7)
    assert all(m["role"] in ("user", "assistant") for c in conversations for m in c)
    assert any("reasoning_content" in m for c in conversations for m in c)
