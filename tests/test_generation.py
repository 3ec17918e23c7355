"""Decoding: batched equals single, sampling controls, stops, and text that streams safely."""

import pytest
import torch

from conftest import random_model, tiny_config
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.generation import (CompletionTracker, SamplingParams, decode_tokens, generate,
                                 sample_next_tokens, stream)
from nanomind.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    data = write_builtin_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", 2000)
    return train_tokenizer([data], vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tiny_config(vocab_size=tokenizer.vocab_size))


PROMPTS = ["The colour of grass is", "3 plus", "小明和小狗去了公园，他们很开心。然后"]


def test_batched_greedy_equals_each_prompt_alone(model, tokenizer):
    params = SamplingParams(max_new_tokens=16, eos_ids=[])
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == 3  # different lengths: real left padding
    batched = list(zip(*decode_tokens(model, prompt_ids, params)))
    for ids, row in zip(prompt_ids, batched):
        alone = [t[0] for t in decode_tokens(model, [ids], params)]
        assert list(row) == alone


def test_seeded_sampling_is_reproducible_and_seed_dependent(model, tokenizer):
    def sample(seed):
        params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed, eos_ids=[])
        return generate(model, tokenizer, PROMPTS, params)[0].token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_1_and_tiny_top_p_are_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, eos_ids=[]))
    for params in (SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=3, eos_ids=[]),
                   SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3, eos_ids=[])):
        assert [c.token_ids for c in generate(model, tokenizer, PROMPTS, params)] == [c.token_ids for c in greedy]


def test_sampling_filters_match_their_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    gen = torch.Generator().manual_seed(0)
    # top_k=2 keeps tokens 0 and 1 only.
    draws = {sample_next_tokens(logits, SamplingParams(temperature=1.0, top_k=2), None, gen).item()
             for _ in range(200)}
    assert draws == {0, 1}
    # top_p: probabilities 0.61, 0.22, 0.14, ... -> 0.7 needs tokens 0 and 1, 0.9 needs 0, 1, 2.
    for top_p, expected in ((0.5, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2})):
        draws = {sample_next_tokens(logits, SamplingParams(temperature=1.0, top_p=top_p), None, gen).item()
                 for _ in range(300)}
        assert draws == expected, top_p
    # Repetition penalty divides positive and multiplies negative logits of seen tokens.
    seen = torch.tensor([[True, False, False, True, False]])
    greedy = SamplingParams(repetition_penalty=4.0)
    assert sample_next_tokens(logits, greedy, seen, gen).item() == 1  # 2.0/4 = 0.5 < 1.0
    assert sample_next_tokens(logits, SamplingParams(), seen, gen).item() == 0


def test_eos_stops_a_row_and_is_not_part_of_the_text(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=10, eos_ids=[]))[0]
    third = free.token_ids[2]
    stopped = generate(model, tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=10, eos_ids=[third]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(third)]
    assert free.finish_reason == "length" and len(free.token_ids) == 10


def test_stop_strings_cut_the_text_in_batch_and_in_stream(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=24, eos_ids=[]))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    params = SamplingParams(max_new_tokens=24, eos_ids=[], stop=[stop])
    batch = generate(model, tokenizer, PROMPTS[:1], params)[0]
    assert batch.finish_reason == "stop"
    assert batch.text == free.text[:free.text.index(stop)]
    text_stream = stream(model, tokenizer, PROMPTS[0], params)
    assert "".join(text_stream) == batch.text
    assert text_stream.completion.finish_reason == "stop"


def test_streamed_text_equals_the_batch_text(model, tokenizer):
    params = SamplingParams(max_new_tokens=20, eos_ids=[])
    for prompt, completion in zip(PROMPTS, generate(model, tokenizer, PROMPTS, params)):
        assert "".join(stream(model, tokenizer, prompt, params)) == completion.text


def test_tracker_never_releases_half_a_character_or_a_possible_stop(tokenizer):
    text = "你好😀 END done"
    ids = tokenizer.encode(text)
    byte_lengths = [len(tokenizer.token_bytes(i)) for i in ids]
    assert any(b < 3 for b, i in zip(byte_lengths, ids) if tokenizer.decode([i]) == "\ufffd"), \
        "the test needs a character split across tokens"
    tracker = CompletionTracker(tokenizer, SamplingParams(stop=["END"]), eos_ids=[])
    released = []
    for i in ids:
        piece = tracker.push(i, is_last=False)
        assert "\ufffd" not in piece
        released.append(piece)
        if tracker.finished:
            break
    assert "".join(released) == "你好😀 "
    assert tracker.completion.finish_reason == "stop"
    # While "E" and "EN" were pending they could still begin "END": nothing after the space was out.
    assert all("E" not in piece for piece in released)


def test_prompt_longer_than_the_context_is_a_clear_error(tokenizer):
    small = random_model(tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(small, tokenizer, ["x" * 40], SamplingParams(max_new_tokens=4))
