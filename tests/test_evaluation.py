"""Held-out measurements agree with an independent computation on hand-made files."""

import json
import math

import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.dpo import sequence_logps
from nanomind.evaluation import held_out_loss, preference_accuracy
from nanomind.tokenizer import train_tokenizer


def test_loss_perplexity_and_bits_per_byte_of_a_text_file(tmp_path):
    corpus = write_builtin_jsonl(tmp_path / "text.jsonl", 300)
    tokenizer = train_tokenizer([corpus], vocab_size=400, out_dir=tmp_path / "tok")
    docs = ["The cat sat on the mat.", "北京是中国的首都。", "3 plus 4 equals 7."]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    result = held_out_loss(model, tokenizer, tmp_path / "tok", [tmp_path / "eval.jsonl"], kind="pretrain", seq_len=64)

    # Independently: each document followed by end-of-text, every next token scored once.
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.pad_id]]
    ids = torch.tensor([stream])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    losses = F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="none")
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in stream[1:])
    assert result["tokens"] == len(stream) - 1
    assert math.isclose(result["loss"], losses.mean().item(), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(losses.mean().item()), rel_tol=1e-4)
    assert math.isclose(result["bits_per_byte"], losses.sum().item() / math.log(2) / n_bytes, rel_tol=1e-5)


def test_preference_accuracy_counts_pairs_the_model_prefers(tmp_path):
    corpus = write_builtin_jsonl(tmp_path / "text.jsonl", 300)
    tokenizer = train_tokenizer([corpus], vocab_size=400, out_dir=tmp_path / "tok")
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    answers = [("Seven.", "Eight, I think."), ("Paris is the capital.", "No idea."), ("Yes.", "Yes.")]
    pairs = [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": c}],
              "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": r}]}
             for c, r in answers]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = preference_accuracy(model, tokenizer, tmp_path / "tok", [tmp_path / "dpo.jsonl"])

    def score(conversation):  # the assistant tokens' summed log-probability, computed on its own
        prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation)
        ids = tokenizer.encode(full)
        start = len(tokenizer.encode(prompt))
        end = ids.index(tokenizer.eos_id, start) + 1  # the answer and its end-of-turn token
        targets = torch.full((1, len(ids) - 1), -100)
        targets[0, start - 1:end - 1] = torch.tensor(ids[start:end])
        with torch.no_grad():
            return sequence_logps(model(torch.tensor([ids[:-1]])).logits, targets)[0].item()

    wins = sum(score(p["chosen"]) > score(p["rejected"]) for p in pairs)
    assert result["pairs"] == 3 and result["accuracy"] == wins / 3  # the tie (third pair) is not a win
