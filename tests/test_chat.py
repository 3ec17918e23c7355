"""`nanomind chat` as a user runs it: a real process reading a terminal conversation from stdin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import random_model, tiny_config
from nanomind.checkpoint import save_checkpoint
from nanomind.tokenizer import Tokenizer
from test_server import COUNT_QUESTION, COUNT_REPLY, SKY_ANSWER, SKY_QUESTION, SKY_REASONING, scripted_checkpoint


def chat_process(model_dir, *flags):
    return subprocess.Popen([sys.executable, "-m", "nanomind.cli", "chat", "--model", str(model_dir),
                             "--temperature", "0", "--device", "cpu", *map(str, flags)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.getbasetemp())


def test_conversation_commands_and_multiline_input(model_dir):
    script = "\n".join([
        COUNT_QUESTION[0]["content"],
        "/reset",
        "/think",
        SKY_QUESTION[0]["content"],
        "/think",
        "/system Be brief.",
        "/nonsense",
        "first line \\",        # a backslash continues the message on the next line
        "second line",
        '"""',
        "a block",
        "of lines",
        '"""',
        "/exit",
    ]) + "\n"
    # "count to twenty" is 50 tokens with digits split one per token
    process = chat_process(model_dir, "--max-new-tokens", 80)
    out, err = process.communicate(script, timeout=120)
    assert process.returncode == 0, err
    assert COUNT_REPLY in out
    assert "[conversation cleared]" in out and "[thinking on]" in out and "[thinking off]" in out
    # With thinking on, the reasoning is printed first, then a blank line, then the answer.
    assert f"{SKY_REASONING}\n\n{SKY_ANSWER}" in out
    assert "[system prompt set; conversation cleared]" in out and "[unknown command /nonsense" in out
    assert "Traceback" not in err


def endless_model(tokenizer, token: str):
    """A model that answers `token` forever, whatever it reads: every block adds nothing to the
    residual stream, every embedding row is the same vector, and only `token`'s output row is non-zero."""
    (token_id,) = tokenizer.encode(token)
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=8192,
                                     tie_word_embeddings=False))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    return model


def test_ctrl_c_stops_the_reply_not_the_program(model_dir, tmp_path):
    # The reply would run for 8000 tokens of visible text (no end-of-turn, no whitespace that the
    # reply parser holds back), so only Ctrl-C can end it in time.
    tokenizer = Tokenizer.load(model_dir)
    save_checkpoint(endless_model(tokenizer, "a"), tmp_path / "endless", tokenizer=tokenizer)
    process = chat_process(tmp_path / "endless", "--max-new-tokens", 8000)
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    process.stdin.write("Tell me a long story.\n")
    process.stdin.flush()
    deadline = time.time() + 60

    def reply_so_far() -> str:
        text = "".join(output)
        return text.split(">>> ", 1)[1] if ">>> " in text else ""

    # Interrupt as soon as the reply has begun streaming: a few characters after the prompt.
    while time.time() < deadline and len(reply_so_far()) < 8:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    while time.time() < deadline and "[stopped]" not in "".join(output):
        time.sleep(0.05)
    assert "[stopped]" in "".join(output)
    process.stdin.write("/exit\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == 0  # still alive after Ctrl-C, and quits cleanly
    assert "Traceback" not in process.stderr.read()


def test_generate_chat_shows_reasoning_then_answer(model_dir, capsys):
    from nanomind import cli
    cli.main(["generate", "--model", str(model_dir), "--chat", "--think", "--prompt", SKY_QUESTION[0]["content"],
              "--max-new-tokens", "40", "--device", "cpu"])
    assert capsys.readouterr().out == f"[reasoning]\n{SKY_REASONING}\n\n[answer]\n{SKY_ANSWER}"
