"""`nanomind export gguf`: the file read back with gguf's own reader holds llama.cpp's qwen3 layout,
the weights, and the tokenizer; llama.cpp (when installed) decodes the same greedy tokens."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Regex, pre_tokenizers

from conftest import random_model, tiny_config
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.checkpoint import save_checkpoint
from nanomind.export_gguf import export_gguf, gguf_pre_tokenizer, gguf_tensors
from nanomind.generation import SamplingParams, generate
from nanomind.tokenizer import QWEN2_SPLIT_PATTERN, train_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([write_builtin_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", 1000)],
                           vocab_size=400)


def checkpoint(tmp_path, tokenizer, **config):
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size, **config))
    return model, save_checkpoint(model, tmp_path / "model", tokenizer=tokenizer)


def field(reader, key):
    return reader.fields[key].contents()


def test_qwen3_layout_weights_and_tokenizer_read_back(tmp_path, tokenizer):
    model, model_dir = checkpoint(tmp_path, tokenizer, tie_word_embeddings=False)
    out = tmp_path / "nano.gguf"
    result = subprocess.run([sys.executable, "-m", "nanomind.cli", "export", "gguf", "--model", str(model_dir),
                             "--out", str(out), "--dtype", "f32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(out)
    c = model.config
    assert field(reader, "general.architecture") == "qwen3"
    expected = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                "attention.key_length": c.head_dim, "attention.value_length": c.head_dim}
    for key, value in expected.items():
        assert field(reader, f"qwen3.{key}") == value, key
    assert field(reader, "qwen3.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(reader, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)

    # Tensor names are the ones llama.cpp's qwen3 loader asks for; shapes are GGUF's reversed order.
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]
               for i in range(c.num_hidden_layers)}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) <= allowed
    assert len(tensors) == 3 + 11 * c.num_hidden_layers  # embeddings, final norm, untied output, 11 per block
    for name, weight in gguf_tensors(model).items():
        t = tensors[name]
        assert list(reversed(t.shape.tolist())) == list(weight.shape), name
        assert np.array_equal(np.asarray(t.data).reshape(weight.shape), weight.numpy()), name
    assert torch.equal(gguf_tensors(model)["blk.1.attn_q_norm.weight"], model.model.layers[1].self_attn.q_norm.weight)

    # nanomind's default tokenizer splits text as Qwen2 does, which llama.cpp knows as "qwen2".
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and tokens[21] == "<tool_call>"
    assert all(tokenizer.token_to_id(t) == i for i, t in enumerate(tokens))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == types[20] == 3 and types[21] == types[35] == 4 and set(types[36:]) == {1}
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tokenizer.vocab_size - 36 - 256 and all(len(m.split(" ")) == 2 for m in merges)
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id")) == (c.bos_token_id, c.eos_token_id, c.pad_token_id)
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./nano.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_dtypes_keep_the_weights_close(tmp_path, tokenizer, dtype):
    model, model_dir = checkpoint(tmp_path, tokenizer)
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / f"nano-{dtype}.gguf", dtype=dtype))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    for name, weight in gguf_tensors(model).items():
        t = tensors[name]
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(weight.shape)
        if weight.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.Q8_0)
        scale = weight.abs().max().item()
        assert np.abs(values - weight.numpy()).max() <= scale * (1e-3 if dtype == "f16" else 1e-2), name


def test_moe_experts_are_stacked(tmp_path, tokenizer):
    model = random_model(tiny_config(moe=True, vocab_size=tokenizer.vocab_size))
    model_dir = save_checkpoint(model, tmp_path / "moe", tokenizer=tokenizer)
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / "moe.gguf", dtype="f32"))
    c = model.config
    assert field(reader, "general.architecture") == "qwen3moe"
    assert field(reader, "qwen3moe.expert_count") == c.num_experts
    assert field(reader, "qwen3moe.expert_used_count") == c.num_experts_per_tok
    assert field(reader, "qwen3moe.expert_feed_forward_length") == c.moe_intermediate_size
    allowed = {gguf.TENSOR_NAMES[t].format(bid=0) + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]}
    tensors = {t.name: t for t in reader.tensors}
    assert {n for n in tensors if n.startswith("blk.0.")} <= allowed
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert list(reversed(gate.shape.tolist())) == [c.num_experts, c.moe_intermediate_size, c.hidden_size]
    expert2 = np.asarray(gate.data).reshape(c.num_experts, c.moe_intermediate_size, c.hidden_size)[2]
    assert np.array_equal(expert2, model.model.layers[0].mlp.experts[2].gate_proj.weight.detach().numpy())


def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it(tmp_path):
    text = write_builtin_jsonl(tmp_path / "text.jsonl", 300)
    assert gguf_pre_tokenizer(train_tokenizer([text], vocab_size=400, pre_tokenizer="gpt2")) == "gpt-2"
    assert gguf_pre_tokenizer(train_tokenizer([text], vocab_size=400, pre_tokenizer="qwen2")) == "qwen2"
    # Real Qwen2 / Qwen3 files say trim_offsets false: offsets bookkeeping, the same pieces.
    qwen = train_tokenizer([text], vocab_size=400)
    qwen.hf_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    assert gguf_pre_tokenizer(qwen) == "qwen2"
    # A rule llama.cpp has no name for would tokenize differently there: refused, not guessed.
    foreign = train_tokenizer([text], vocab_size=400)
    foreign.hf_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="llama.cpp has no name"):
        gguf_pre_tokenizer(foreign)


def test_llama_cpp_greedy_tokens_match(tmp_path, tokenizer):
    try:
        import llama_cpp
    except ImportError:
        reason = ("llama-cpp-python is not installed (no binary wheel here; `pip install llama-cpp-python` "
                  "builds llama.cpp from source): skipping the llama.cpp greedy comparison")
        print(reason)
        pytest.skip(reason)
    model, model_dir = checkpoint(tmp_path, tokenizer)
    path = export_gguf(model_dir, tmp_path / "nano.gguf", dtype="f32")
    prompt = "The colour of grass is green; 12 + 345 = 357"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tokenizer.encode(prompt)
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 12:
            break
    ours = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=12, eos_ids=[]))[0].token_ids
    assert theirs == ours
