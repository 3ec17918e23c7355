"""The model against independent implementations: transformers' Qwen3, a naive attention, itself uncached."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from nanomind.checkpoint import save_checkpoint
from nanomind.model import (ONEDNN_LINEAR, KVCache, NanoMind, PRESETS, apply_rotary, head_cross_entropy, linear,
                            preset_config)

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, moe):
    # top-2 for MoE so the renormalised routing weights are not trivially 1.
    model = random_model(tiny_config(moe=moe, num_experts_per_tok=2 if moe else 1))
    save_checkpoint(model, tmp_path / "ckpt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(reference).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")

    ids = torch.randint(3, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    from nanomind.generation import SamplingParams, decode_tokens
    prompt = ids[0, :7]
    with torch.no_grad():
        expected = reference.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, min_new_tokens=12)[0, 7:].tolist()
    got = [t[0] for t in decode_tokens(model, [prompt.tolist()], SamplingParams(max_new_tokens=12))]
    assert got == expected


def test_yarn_matches_transformers_beyond_the_original_length(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}
    model = random_model(tiny_config(rope_scaling=yarn))
    save_checkpoint(model, tmp_path / "ckpt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(3, 320, (1, 40))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() < 1e-4


def test_yarn_changes_nothing_below_the_original_length():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    plain, scaled = random_model(tiny_config()), random_model(tiny_config(rope_scaling=yarn))
    short, long = torch.randint(3, 320, (2, 32)), torch.randint(3, 320, (2, 48))
    with torch.no_grad():
        assert torch.equal(plain(short).logits, scaled(short).logits)
        assert not torch.allclose(plain(long).logits, scaled(long).logits)


def naive_attention(q, k, v, mask):
    """Textbook attention with K/V heads repeated explicitly: the reference for the fused path."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_fused_attention_matches_naive_attention():
    model = random_model(tiny_config())
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, 64)
    positions = torch.arange(9).expand(2, 9)
    cos, signed_sin = model.rotary(positions, 9)

    def textbook_rotary(t):  # rotate-half RoPE with theta 1e6, written out
        angles = positions[0, :, None].double() * 1e6 ** (-torch.arange(0, 16, 2).double() / 16)
        cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
        first, second = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-second, first), dim=-1) * sin

    with torch.no_grad():
        fused = attn(x, cos, signed_sin, None, None, 0)
        q = attn.q_norm(attn.q_proj(x).view(2, 9, 4, 16)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(2, 9, 2, 16)).transpose(1, 2)
        v = attn.v_proj(x).view(2, 9, 2, 16).transpose(1, 2)
        assert (apply_rotary(q, cos, signed_sin) - textbook_rotary(q)).abs().max().item() < 1e-5
        q, k = textbook_rotary(q), textbook_rotary(k)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        expected = attn.o_proj(naive_attention(q, k, v, causal).transpose(1, 2).reshape(2, 9, 64))
    assert (fused - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_decoding_equals_full_forward(moe):
    model = random_model(tiny_config(moe=moe))
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
        pieces = [model(ids[:, :8], cache=cache).logits]  # prefill
        pieces.append(model(ids[:, 8:12], cache=cache).logits)  # a chunk on top of a cache
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)]  # token by token
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fused_projections_keep_the_function_the_names_and_the_memory(moe):
    model = random_model(tiny_config(moe=moe))
    fused = random_model(tiny_config(moe=moe)).fuse_projections()
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        cache = KVCache(fused.config, 2, 20, "cpu", torch.float32)
        steps = [fused(ids[:, :12], cache=cache).logits] + [fused(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids).logits, rtol=0, atol=1e-5)
    # Same names and values; q/k/v (and gate/up) now share one buffer instead of adding one.
    expected = model.state_dict()
    assert fused.state_dict().keys() == expected.keys()
    for name, tensor in fused.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    attention = fused.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()
    assert attention.v_proj.weight.untyped_storage().data_ptr() == attention.qkv_weight.untyped_storage().data_ptr()


def kernels_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN")
def test_linear_takes_onednn_for_large_weights_at_inference_and_gives_f_linear_results():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 512, generator=g) / 512 ** 0.5
    hidden = torch.randn(3, 7, 512, generator=g)
    inputs = {"rows": hidden[0], "3-d": hidden, "strided (last position)": hidden[:, -1:]}
    for name, x in inputs.items():
        with torch.inference_mode():
            assert "mkldnn::_linear_pointwise" in kernels_run(lambda: linear(x, weight)), name
            torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    # Where a backward is needed, or the weight is small, it is F.linear (MKL) with its gradient.
    x = hidden.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in kernels_run(lambda: linear(x, weight))
    linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x))
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in kernels_run(lambda: linear(hidden, weight[:64]))


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN")
def test_decoding_through_onednn_equals_the_full_forward():
    # Wide enough that every projection and the head take oneDNN while decoding.
    model = random_model(tiny_config(hidden_size=512, intermediate_size=1024, vocab_size=1024,
                                     num_attention_heads=4, num_key_value_heads=4, head_dim=128)).fuse_projections()
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits.detach()  # autograd on: MKL throughout
    with torch.inference_mode():
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        pieces = [model(ids[:, :10], cache=cache).logits]
        step = lambda t: model(ids[:, t:t + 1], cache=cache).logits
        assert "mkldnn::_linear_pointwise" in kernels_run(lambda: pieces.append(step(10)))
        pieces += [step(t) for t in range(11, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


def test_last_logits_only_is_the_last_row_of_the_full_forward(dense_model):
    ids = torch.randint(3, 320, (3, 11))
    with torch.no_grad():
        assert torch.allclose(dense_model(ids, last_logits_only=True).logits, dense_model(ids).logits[:, -1:],
                              atol=1e-6)


def test_left_padded_rows_equal_unpadded_rows(dense_model):
    short, long = torch.randint(3, 320, (1, 5)), torch.randint(3, 320, (1, 12))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 7), torch.ones(1, 5)], 1), torch.ones(1, 12)]).long()
    with torch.no_grad():
        batched = dense_model(batch, attention_mask=mask).logits
        assert not batched.isnan().any()
        assert (batched[0, 7:] - dense_model(short).logits[0]).abs().max().item() < 1e-5
        assert (batched[1] - dense_model(long).logits[0]).abs().max().item() < 1e-5


def test_loss_is_next_token_cross_entropy_ignoring_minus_100(dense_model):
    ids = torch.randint(3, 320, (2, 10))
    targets = torch.randint(3, 320, (2, 10))
    targets[0, :4] = -100
    out = dense_model(ids, targets=targets)
    assert out.logits is None  # the loss is computed chunk by chunk, never from full logits
    keep = targets != -100
    expected = F.cross_entropy(dense_model(ids).logits[keep], targets[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.aux_loss is None


@pytest.mark.parametrize("chunk_rows", [3, 7, 64])
def test_chunked_head_cross_entropy_matches_plain_cross_entropy_and_its_gradients(chunk_rows):
    hidden = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[0, 5, 6, 19]] = -100
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected * 3, (hidden, weight))
    loss = head_cross_entropy(hidden, weight, targets, chunk_rows)
    grads = torch.autograd.grad(loss * 3, (hidden, weight))  # the outer gradient scales both
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_model_gradients_with_targets_equal_a_plain_cross_entropy_on_its_logits():
    # The tied embedding gets gradient from both the input lookup and the chunked head.
    model = random_model(tiny_config()).double()
    ids = torch.randint(3, 320, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    model(ids, targets=targets).loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=0, atol=1e-10, msg=name)


def test_chunked_head_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    hidden, weight = torch.randn(40, 32, requires_grad=True), torch.randn(300, 32) * 0.1
    weight.requires_grad_()
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(hidden, weight, targets, 16)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    expected = F.cross_entropy(hidden.detach() @ weight.detach().T, targets)
    assert abs(loss.item() - expected.item()) < 0.02


def test_router_learns_from_the_language_model_loss_with_top1_routing():
    model = random_model(tiny_config(moe=True, num_experts_per_tok=1, router_aux_loss_coef=0.0)).train()
    ids = torch.randint(3, 320, (2, 16))
    out = model(ids, targets=torch.roll(ids, -1, 1))
    out.loss.backward()  # the LM loss alone: aux coefficient 0
    for block in model.model.layers:
        assert block.mlp.gate.weight.grad.abs().sum() > 0
    assert out.aux_loss is not None and out.aux_loss.item() >= 1.0 - 1e-6  # >= 1, equal only when balanced


def test_moe_runs_each_expert_on_its_routed_tokens_only():
    model = random_model(tiny_config(moe=True, num_experts_per_tok=2))
    moe = model.model.layers[0].mlp
    seen_rows = []
    hooks = [e.register_forward_hook(lambda m, i, o: seen_rows.append(i[0].shape[0])) for e in moe.experts]
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        out, _ = moe(x)
        # Reference: every expert densely on every token, combined with the renormalised top-2 weights.
        probs = moe.gate(x[0]).softmax(-1)
        w, idx = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        dense = torch.stack([e(x[0]) for e in moe.experts], 1)  # (N, E, C)
        expected = (dense.gather(1, idx[..., None].expand(-1, -1, 64)) * w[..., None]).sum(1)
    for h in hooks:
        h.remove()
    assert sum(seen_rows[:4]) == 10 * 2  # 20 (token, expert) assignments, no dense compute
    assert (out[0] - expected).abs().max().item() < 1e-5


def test_presets_have_the_documented_sizes():
    counts = {name: NanoMind(preset_config(name), verbose=False).num_parameters() for name in ("small", "base")}
    assert 25e6 < counts["small"] < 27e6
    assert counts["base"] == 63_912_192  # MiniMind-3's logged "63.91M"
    moe = preset_config("base-moe")
    assert moe.num_experts == 4 and moe.num_experts_per_tok == 1
    assert set(PRESETS) >= {"tiny", "small", "base", "base-moe"}
    assert preset_config("base", num_hidden_layers=2).num_hidden_layers == 2


def test_parameter_count_is_printed_on_creation(capsys):
    NanoMind(tiny_config(moe=True))
    printed = capsys.readouterr().out
    assert "M parameters" in printed and "active" in printed


def test_a_training_step_skips_the_dropped_layers_and_nothing_else_does():
    from nanomind.checkpoint import keep_layers

    model = random_model(tiny_config(num_hidden_layers=4))
    ids = torch.randint(0, 320, (2, 12))
    full = model(ids).logits
    without_middle = keep_layers(model, [0, 3])(ids).logits
    model.skipped_layers = frozenset({1, 2})
    model.train()
    assert torch.allclose(model(ids).logits, without_middle, atol=1e-5)
    with torch.no_grad():  # evaluation and generation, RL rollouts included, run every layer
        assert torch.allclose(model(ids).logits, full, atol=1e-5)
    model.eval()
    assert torch.allclose(model(ids).logits, full, atol=1e-5)
