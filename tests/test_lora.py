"""LoRA: adapters train alone on a frozen base, save in PEFT's layout (peft loads them and agrees),
merge into a plain checkpoint, resume, and work on MoE models and under torch.compile."""

import contextlib
import io
import json

import pytest
import torch
from safetensors import safe_open

from conftest import random_model, tiny_config
from nanomind import cli
from nanomind.checkpoint import CheckpointError, load_model, save_checkpoint
from nanomind.lora import LoRAConfig, LoRALinear, add_lora, count_parameters, load_adapter, merge_lora, save_adapter
from nanomind.prepare import PrepareOptions, load_manifest, open_rows, prepare
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer
from nanomind.trainer import Distributed, Stage, TrainSettings, token_loss, train

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint with a real tokenizer, and the built-in LoRA domain data."""
    folder = tmp_path_factory.mktemp("lora")
    synthesize(folder / "data", size="tiny", seed=0)
    tokenizer = train_tokenizer([folder / "data" / "sft.jsonl"], vocab_size=400, out_dir=folder / "tok")
    save_checkpoint(random_model(tiny_config(vocab_size=tokenizer.vocab_size)), folder / "base", tokenizer=tokenizer)
    return folder


def expected_lora_parameters(model, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def randomise_adapters(model, seed: int = 1) -> None:
    """Give every B a non-zero value, so the adapter changes the output (training starts at B = 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.05)


@pytest.mark.parametrize("moe", [False, True])
def test_adapters_start_as_the_identity_and_merging_changes_nothing(moe):
    model = random_model(tiny_config(moe=moe))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = model(ids).logits
    expected_count = expected_lora_parameters(model, rank=4)
    wrapped = add_lora(model, LoRAConfig(rank=4, alpha=8))
    if moe:  # every expert's projections are adapted; the router is not
        assert "model.layers.0.mlp.experts.3.down_proj" in wrapped and "model.layers.0.mlp.gate" not in wrapped
    trainable, total = count_parameters(model)
    assert trainable == expected_count and total > trainable
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(model(ids).logits, before)  # B = 0: exactly the base model

    randomise_adapters(model)
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, before, atol=1e-3)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_lora_under_torch_compile_matches_eager_and_only_adapters_get_gradients():
    model = random_model(tiny_config(moe=True))
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    randomise_adapters(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    eager_out, compiled_out = model(ids, targets=ids), compiled(ids, targets=ids)
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, atol=1e-5, rtol=0)
    compiled_out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_training_moves_only_the_adapters(base, tmp_path):
    tokenizer = Tokenizer.load(base / "base")
    prepare([base / "data" / "lora_domain.jsonl"], base / "base", tmp_path / "prepared",
            PrepareOptions(kind="sft", seq_len=128, val_fraction=0.1), verbose=False)
    manifest = load_manifest(tmp_path / "prepared", tokenizer, "sft")
    rows = open_rows(tmp_path / "prepared", "train", manifest, tokenizer.pad_id)
    model = load_model(base / "base")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    train(Stage("lora", rows, None, token_loss), model, tokenizer,
          TrainSettings(out=tmp_path / "run", batch_size=4, max_steps=6, lr=1e-2, eval_every=0),
          Distributed(), torch.device("cpu"))
    after = dict(model.named_parameters())
    for name, weight in frozen.items():
        wrapped = name.replace(".weight", ".base_layer.weight") if name not in after else name
        assert torch.equal(after[wrapped], weight), name  # bit-identical
    assert all(p.abs().sum() > 0 for n, p in after.items() if "lora_B" in n)


def run_lora(base, out, *extra):
    cli.main(["lora", "--init-from", str(base / "base"), "--data", str(base / "data" / "lora_domain.jsonl"),
              "--seq-len", "128", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--alpha", "8",
              "--eval-every", "1000", "--warmup-steps", "2", "--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """`nanomind lora` run for a few steps: (its folder, what it printed)."""
    out = tmp_path_factory.mktemp("lora_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_lora(base, out, "--max-steps", 8)
    return out, printed.getvalue()


def test_lora_command_writes_a_peft_adapter_that_peft_loads_with_the_same_logits(base, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run, printed = trained
    expected = expected_lora_parameters(load_model(base / "base"), rank=4)
    assert f"{expected:,} trainable parameters" in printed

    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert len(names) == 2 * 7 * 2  # A and B for 7 layers in each of 2 blocks, nothing else
    assert all(n.startswith("base_model.model.model.layers.") and ".lora_" in n for n in names)

    ours = load_adapter(load_model(base / "base"), adapter)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=0)
        plain = load_model(base / "base")(ids).logits
    assert not torch.allclose(ours(ids).logits, plain, atol=1e-3)  # the adapter learned something

    cli.main(["lora", "merge", "--model", str(base / "base"), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(merged(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_lora_resumes_exactly(base, tmp_path):
    def losses(run):
        return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]

    run_lora(base, tmp_path / "full", "--max-steps", 6, "--save-every", 3, "--keep-last", 3)
    run_lora(base, tmp_path / "cut", "--max-steps", 6, "--save-every", 3, "--keep-last", 3)
    # Pretend the second run died after step 3: only its step-3 adapter checkpoint is left.
    import shutil
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    run_lora(base, tmp_path / "cut", "--max-steps", 6, "--save-every", 3, "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    with safe_open(tmp_path / "full" / "adapter" / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "cut" / "adapter" / "adapter_model.safetensors", framework="pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_an_adapter_for_another_model_is_a_clear_error(tmp_path):
    model = random_model(tiny_config())
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    save_adapter(tmp_path / "adapter", LoRAConfig(rank=4, alpha=8), model.state_dict())
    wider = random_model(tiny_config(hidden_size=96))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(wider, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        load_adapter(random_model(tiny_config()), tmp_path)


def test_generate_and_serve_take_the_adapter_unmerged(base, trained, capsys):
    from test_server import Server
    from nanomind.generation import SamplingParams, generate

    adapter = trained[0] / "adapter"
    model, tokenizer = load_adapter(load_model(base / "base"), adapter), Tokenizer.load(base / "base")
    expected = generate(model, tokenizer, ["Once upon a time"], SamplingParams(max_new_tokens=12, temperature=0))[0].text
    cli.main(["generate", "--model", str(base / "base"), "--adapter", str(adapter), "--prompt", "Once upon a time",
              "--max-new-tokens", "12", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("Once upon a time" + expected)

    server = Server(base / "base", "--adapter", adapter)
    try:
        server.wait_ready()
        reply = server.client().completions.create(model="base", prompt="Once upon a time", max_tokens=12,
                                                   temperature=0)
    finally:
        log = server.stop()
    assert expected and reply.choices[0].text == expected, log
