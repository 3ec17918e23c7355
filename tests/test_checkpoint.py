"""Checkpoints: strict loading, atomic saving, importing Hugging Face and MiniMind weights."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config
from nanomind import checkpoint
from nanomind.checkpoint import CheckpointError, convert, load_model, save_checkpoint
from nanomind.tokenizer import Tokenizer, train_tokenizer
from nanomind.builtin_text import write_builtin_jsonl


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer([write_builtin_jsonl(folder / "text.jsonl", 500)], vocab_size=320, out_dir=folder / "tokenizer")
    return folder / "tokenizer"


def logits_of(model, seed=0):
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_is_exact_and_files_are_the_hf_layout(tmp_path, tokenizer_dir):
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=Tokenizer.load(tokenizer_dir))
    names = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "qwen3"
    assert torch.equal(logits_of(load_model(tmp_path / "ckpt")), logits_of(model))


def corrupt(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(160, 64\)\)"),
    (lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(3)}),
     r"unexpected tensor model\.layers\.9\.extra\.weight \(shape \(3,\)\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(65)}),
     r"tensor model\.norm\.weight has shape \(65,\), the model expects \(64,\)"),
], ids=["missing", "unexpected", "shape"])
def test_loading_is_strict_and_names_the_tensor(tmp_path, edit, message):
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    corrupt(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ckpt")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = random_model(tiny_config(), seed=1)
    save_checkpoint(first, tmp_path / "ckpt")

    def crash_half_way(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-save

    monkeypatch.setattr(checkpoint, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(random_model(tiny_config(), seed=2), tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind
    assert torch.equal(logits_of(load_model(tmp_path / "ckpt")), logits_of(first))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_convert_imports_a_transformers_qwen3_folder(tmp_path, tokenizer_dir, moe):
    transformers = pytest.importorskip("transformers")
    original = random_model(tiny_config(moe=moe))
    save_checkpoint(original, tmp_path / "seed")
    # A folder written by transformers itself (as downloaded from the hub), with a tokenizer.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seed")
    hf_model.save_pretrained(tmp_path / "hf")
    Tokenizer.load(tokenizer_dir).save(tmp_path / "hf")

    kind, _ = convert(tmp_path / "hf", tmp_path / "out")
    assert kind == ("huggingface-qwen3-moe" if moe else "huggingface-qwen3")
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert (logits_of(load_model(tmp_path / "out")) - logits_of(original)).abs().max() < 1e-5


def test_convert_imports_a_minimind_pth(tmp_path, tokenizer_dir):
    original = random_model(tiny_config(moe=True))
    # MiniMind's torch.save(model.state_dict()) also holds an untied-looking lm_head and RoPE tables.
    state = {k: v.half() for k, v in original.state_dict().items()}
    state["freqs_cos"] = torch.zeros(8, 16)
    torch.save(state, tmp_path / "full_sft_64_moe.pth")

    with pytest.raises(CheckpointError, match="--tokenizer"):
        convert(tmp_path / "full_sft_64_moe.pth", tmp_path / "out")
    kind, model = convert(tmp_path / "full_sft_64_moe.pth", tmp_path / "out", tokenizer_dir=tokenizer_dir)
    assert kind == "minimind-pth"
    assert model.config.num_experts == 4 and model.config.tie_word_embeddings
    loaded = load_model(tmp_path / "out", dtype=torch.float32)
    expected = random_model(tiny_config(moe=True))
    expected.load_state_dict({k: v.float() for k, v in state.items() if k != "freqs_cos"})
    assert (logits_of(loaded) - logits_of(expected)).abs().max() < 1e-5


def test_convert_rejects_what_it_cannot_read(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        convert(tmp_path / "llama", tmp_path / "out")
    with pytest.raises(CheckpointError, match="neither"):
        convert(tmp_path / "nothing.txt", tmp_path / "out")


@pytest.mark.parametrize("moe", [False, True])
def test_keep_layers_runs_the_kept_blocks_of_the_source(tmp_path, tokenizer_dir, moe):
    model = random_model(tiny_config(moe=moe, num_hidden_layers=4, tie_word_embeddings=not moe))
    save_checkpoint(model, tmp_path / "teacher", tokenizer=Tokenizer.load(tokenizer_dir))
    kind, pruned = convert(tmp_path / "teacher", tmp_path / "student", layers=[0, 3])
    assert kind == ("huggingface-qwen3-moe" if moe else "huggingface-qwen3") and pruned.config.num_hidden_layers == 2
    assert (tmp_path / "student" / "tokenizer.json").is_file()

    # By hand: the source's embedding, its blocks 0 and 3, final norm and head.
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cos, sin = model.rotary(torch.arange(13).expand(2, 13), 13)
        x = model.model.embed_tokens(ids)
        for i in (0, 3):
            x, _ = model.model.layers[i](x, cos, sin, None, None, i)
        if moe:  # untied: the head is a tensor of its own, kept as it is
            assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        expected = model.lm_head(model.model.norm(x))
    assert torch.allclose(logits_of(load_model(tmp_path / "student")), expected, atol=1e-6)

    for layers, message in (([0, 4], "has layers 0..3"), ([1, 1], "names a layer twice"), ([], "at least one")):
        with pytest.raises(CheckpointError, match=message):
            convert(tmp_path / "teacher", tmp_path / "bad", layers=layers)
    assert not (tmp_path / "bad").exists()
