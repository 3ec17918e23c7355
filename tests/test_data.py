"""Reading and preparing data: strict errors, the SFT loss mask, lossless packing, determinism."""

import json
import subprocess
import sys

import numpy as np
import pytest

from nanomind.builtin_text import builtin_conversations, write_builtin_jsonl
from nanomind.data import BadLines, DataError, read_records
from nanomind.prepare import EMPTY_THINK, PrepareOptions, TokenStore, assistant_loss_mask, open_rows, prepare
from nanomind.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_builtin_jsonl(folder / "text.jsonl", 1500)
    with open(folder / "sft.jsonl", "w", encoding="utf-8") as f:
        for conversation in builtin_conversations(400):
            f.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
    train_tokenizer([folder / "text.jsonl", folder / "sft.jsonl"], vocab_size=500, out_dir=folder / "tok")
    return folder


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, bad_line, message", [
    ("pretrain", '{"text": "ok"', "bad JSON"),
    ("pretrain", '{"txt": "ok"}', "missing key"),
    ("sft", '{"conversations": [{"role": "robot", "content": "hi"}]}', "unknown role: conversations\\[0\\] has role 'robot'"),
    ("sft", '{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ("sft", '{"conversations": [{"role": "assistant", "content": "", "tool_calls": "[{bad"}]}', "tool_calls is not valid JSON"),
    ("dpo", '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "'rejected' is missing"),
    ("agent", '{"conversations": [{"role": "user", "content": "q"}]}', "needs 'gt'"),
])
def test_strict_mode_names_file_line_and_problem(tmp_path, kind, bad_line, message):
    good = {"pretrain": '{"text": "fine"}',
            "sft": '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "dpo": json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}),
            "agent": '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": ["4"]}'}
    path = write_lines(tmp_path / "d.jsonl", [good[kind], good[kind], "", bad_line, good[kind]])
    with pytest.raises(DataError, match=rf"{path}:4: .*{message}"):
        list(read_records([path], kind))
    bad = BadLines()
    assert len(list(read_records([path], kind, skip_bad=True, bad_lines=bad))) == 3
    assert bad.total == 1 and f"{path}:4" in bad.summary()


def test_records_are_normalised(tmp_path):
    line = json.dumps({"conversations": [
        {"role": "system", "content": "s", "tools": '[{"name": "calc"}]'},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "", "tool_calls": '[{"name": "calc", "arguments": {"x": 1}}]'}]})
    [(_, _, record)] = read_records([write_lines(tmp_path / "d.jsonl", [line])], "sft")
    system, user, assistant = record["conversations"]
    assert system["tools"] == [{"name": "calc"}] and user["content"] == "ab"
    assert assistant["tool_calls"] == [{"name": "calc", "arguments": {"x": 1}}]


def test_sft_mask_covers_exactly_the_assistant_turns(workdir):
    tokenizer = Tokenizer.load(workdir / "tok")
    messages = [
        {"role": "system", "content": "Use tools.", "tools": [{"name": "add", "parameters": {}}]},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should add.",
         "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=messages[0]["tools"])
    ids = tokenizer.encode(text)
    header = tokenizer.encode("assistant") + tokenizer.encode("\n")
    mask = assistant_loss_mask(ids, tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>"), header,
                               tokenizer.encode(EMPTY_THINK))
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    # Independently: the text after each "<|im_start|>assistant\n" through its "<|im_end|>", less the empty
    # think block that opens the turn without reasoning (the thinking-off prompt supplies it at inference).
    turns = [turn.split("<|im_end|>")[0] + "<|im_end|>" for turn in text.split("<|im_start|>assistant\n")[1:]]
    assert turns[1].startswith(EMPTY_THINK) and not turns[0].startswith(EMPTY_THINK)
    expected = "".join(turn.removeprefix(EMPTY_THINK) for turn in turns)
    assert trained == expected
    assert "I should add." in trained and '"name": "add"' in trained and "5.<|im_end|>" in trained
    assert trained.count("<think>") == 1  # only the turn that reasons has its think block trained
    assert "What is 2 plus 3?" not in trained and "<tool_response>" not in trained and "Use tools." not in trained


def test_pretrain_packing_loses_and_repeats_no_token(workdir, tmp_path):
    manifest = prepare([workdir / "text.jsonl"], workdir / "tok", tmp_path / "p",
                       PrepareOptions(kind="pretrain", seq_len=64, val_fraction=0.1), verbose=False)
    tokenizer = Tokenizer.load(workdir / "tok")
    assert manifest["padding_fraction"] == 0 and manifest["records"]["val"] > 0
    texts = [json.loads(line)["text"] for line in open(workdir / "text.jsonl", encoding="utf-8")]
    all_tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)
    assert manifest["tokens"]["train"] + manifest["tokens"]["val"] == all_tokens
    rows = open_rows(tmp_path / "p", "train", manifest, tokenizer.pad_id)
    batch = rows.rows(np.arange(len(rows)))
    targets = batch["targets"][batch["targets"] != -100]
    stream = np.asarray(TokenStore(tmp_path / "p", "train", manifest["dtype"]).tokens)
    assert targets.tolist() == stream[1:].tolist()  # every token after the first is a target exactly once


def test_sft_packing_keeps_every_conversation_whole(workdir, tmp_path):
    manifest = prepare([workdir / "sft.jsonl"], workdir / "tok", tmp_path / "s",
                       PrepareOptions(kind="sft", seq_len=256, val_fraction=0.0), verbose=False)
    assert manifest["truncated"] == 0 and 0 < manifest["padding_fraction"] < 0.5
    store = TokenStore(tmp_path / "s", "train", manifest["dtype"])
    tokenizer = Tokenizer.load(workdir / "tok")
    real = np.asarray(store.tokens)[np.asarray(store.tokens) != tokenizer.pad_id]
    conversations = [json.loads(line)["conversations"] for line in open(workdir / "sft.jsonl", encoding="utf-8")]
    expected = [t for c in conversations for t in tokenizer.encode(tokenizer.apply_chat_template(c))]
    assert real.tolist() == expected
    rows = open_rows(tmp_path / "s", "train", manifest, tokenizer.pad_id)
    assert rows.rows([0])["inputs"].shape == (1, 256)


def test_prepare_is_deterministic_with_two_workers_and_a_no_op_when_repeated(workdir, tmp_path, capsys):
    options = PrepareOptions(kind="sft", seq_len=128, val_fraction=0.1, system_prompt_ratio=0.5,
                             empty_think_removal_ratio=0.5)
    one = prepare([workdir / "sft.jsonl"], workdir / "tok", tmp_path / "one", options, workers=1, chunk_size=50)
    two = prepare([workdir / "sft.jsonl"], workdir / "tok", tmp_path / "two", options, workers=2, chunk_size=50)
    for name in ("train.tokens.bin", "train.mask.bin", "val.tokens.bin", "val.mask.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one["key"] == two["key"]
    before = (tmp_path / "two" / "manifest.json").stat().st_mtime_ns
    prepare([workdir / "sft.jsonl"], workdir / "tok", tmp_path / "two", options, workers=2)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "two" / "manifest.json").stat().st_mtime_ns == before


def test_prepare_workers_start_without_torch():
    """Every `prepare --workers K` process imports nanomind.prepare; importing torch too cost each ~3 s
    of start-up, which made 2 workers slower than 1."""
    code = "import sys, nanomind.prepare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_data_prepared_with_another_tokenizer_is_refused(workdir, tmp_path):
    from nanomind.prepare import load_manifest
    prepare([workdir / "text.jsonl"], workdir / "tok", tmp_path / "p",
            PrepareOptions(kind="pretrain", seq_len=64), verbose=False)
    other = train_tokenizer([workdir / "text.jsonl"], vocab_size=400)
    with pytest.raises(DataError, match="different tokenizer"):
        load_manifest(tmp_path / "p", other, "pretrain")
    with pytest.raises(DataError, match="holds pretrain data"):
        load_manifest(tmp_path / "p", None, "sft")


def test_dpo_and_rl_kinds_prepare_their_own_layouts(tmp_path, workdir):
    pair = {"chosen": [{"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "5"}]}
    write_lines(tmp_path / "dpo.jsonl", [json.dumps(pair)] * 3)
    manifest = prepare([tmp_path / "dpo.jsonl"], workdir / "tok", tmp_path / "dpo",
                       PrepareOptions(kind="dpo", seq_len=64, val_fraction=0.0), verbose=False)
    chosen = TokenStore(tmp_path / "dpo", "train.dpo.chosen", manifest["dtype"])
    rejected = TokenStore(tmp_path / "dpo", "train.dpo.rejected", manifest["dtype"])
    assert len(chosen.offsets) == len(rejected.offsets) == 4
    tokenizer = Tokenizer.load(workdir / "tok")
    first = slice(chosen.offsets[0], chosen.offsets[1])
    assert tokenizer.decode(np.asarray(chosen.tokens[first])[np.asarray(chosen.mask[first]) == 1]) == "4<|im_end|>"
    assert tokenizer.decode(np.asarray(rejected.tokens[first])[np.asarray(rejected.mask[first]) == 1]).endswith(
        "5<|im_end|>")

    prompt = {"conversations": [{"role": "user", "content": "3 plus 4?"}, {"role": "assistant", "content": "无"}],
              "gt": "7"}
    write_lines(tmp_path / "rl.jsonl", [json.dumps(prompt, ensure_ascii=False)] * 2)
    manifest = prepare([tmp_path / "rl.jsonl"], workdir / "tok", tmp_path / "rl",
                       PrepareOptions(kind="rl", seq_len=64, val_fraction=0.0), verbose=False)
    records = [json.loads(line) for line in open(tmp_path / "rl" / "train.jsonl", encoding="utf-8")]
    assert manifest["records"]["train"] == 2
    assert records[0] == {"conversations": [{"role": "user", "content": "3 plus 4?"}], "gt": "7"}
