"""RL: each loss matches its formula, the first pass over a rollout has a ratio of 1 and later ones clip,
DAPO drops groups without signal, DDP processes end with identical weights (value model included), a
resume on a rollout boundary is exact, and GRPO raises the reward of a tiny model. Agent RL trains
exactly the model's tokens of multi-turn tool trajectories, scores them by all their turns, and runs
end to end on the synthetic agent data."""

import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading

import pytest
import torch
from conftest import random_model, tiny_config
from test_agent import ScriptedModel

from nanomind import rl
from nanomind.agent import run_agents
from nanomind.checkpoint import load_model, save_checkpoint
from nanomind.cli import build_parser
from nanomind.cli import main as nanomind
from nanomind.model import NanoMind
from nanomind.prepare import PrepareOptions, load_manifest, open_rows, prepare
from nanomind.rewards import answer_text, math_reward, tool_call_reward
from nanomind.rl import (VALUE_FILE, PolicyLoss, add_value_model, aggregate, cispo_loss, clipped_surrogate,
                         clipped_value_loss, data_kind, gae, group_advantages, k3_kl, make_stage, overlong_penalty,
                         render_prompt, settings_from_args, training_layout, whiten)
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer
from nanomind.tools import builtin_tools, tool_schemas
from nanomind.trainer import Distributed, StageInputs

DIGITS_REWARD = '''import re

def digits(prompt, completion, sample):
    """The share of the answer's characters that are digits (special tokens removed)."""
    text = re.sub(r"<[^<>]*>", "", completion)
    return sum(c.isdigit() for c in text) / max(len(text), 1)
'''


# ----------------------------------------------------------------------------------------------
# The formulas, on hand-made tensors

R = torch.tensor([[0.5, 0.95, 1.0, 1.1, 1.5, 0.7]])  # ratios
A = torch.tensor([[1.0, -2.0, 0.5, -1.0, 2.0, -0.5]])  # advantages
OLD = torch.tensor([[-1.0, -2.0, -0.3, -1.7, -0.9, -2.5]])  # rollout log-probs


def test_the_clipped_surrogate_and_cispo_match_their_formulas():
    logps = (OLD + R.log()).requires_grad_()
    low, high = 0.2, 0.28
    loss, clipped = clipped_surrogate(logps, OLD, A, low, high)
    for t, (r, a) in enumerate(zip(R[0].tolist(), A[0].tolist())):
        bounded = min(max(r, 1 - low), 1 + high)
        assert loss[0, t].item() == pytest.approx(-min(r * a, bounded * a), rel=1e-5)
        assert clipped[0, t].item() == (bounded * a < r * a)  # the bound wins the min: no gradient
    assert clipped[0].tolist() == [False, False, False, False, True, True]

    # CISPO: the loss is -w A logp with w = clip(r) held constant, so d loss / d logp = -w A everywhere,
    # also where the ratio is clipped (the clipped surrogate's gradient is 0 there).
    logps = (OLD + R.log()).requires_grad_()
    loss, clipped = cispo_loss(logps, OLD, A, low, high)
    loss.sum().backward()
    weights = [min(max(r, 1 - low), 1 + high) for r in R[0].tolist()]
    for t, (w, a, lp) in enumerate(zip(weights, A[0].tolist(), logps[0].tolist())):
        assert loss[0, t].item() == pytest.approx(-w * a * lp, rel=1e-5)
        assert logps.grad[0, t].item() == pytest.approx(-w * a, rel=1e-5)
    assert clipped[0].tolist() == [True, False, False, False, True, True]  # 0.5 and 0.7 < 0.8; 1.5 > 1.28


def test_k3_and_the_clipped_value_loss_match_their_formulas():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    for got, lp, rf in zip(k3_kl(logps, ref).tolist(), logps.tolist(), ref.tolist()):
        assert got == pytest.approx(math.exp(rf - lp) - (rf - lp) - 1, rel=1e-6)
    values, old, returns = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.5, 2.1]), torch.tensor([2.0, -1.0, 0.0])
    for got, v, o, ret in zip(clipped_value_loss(values, old, returns, 0.2).tolist(), values.tolist(), old.tolist(),
                              returns.tolist()):
        v_clipped = o + min(max(v - o, -0.2), 0.2)
        assert got == pytest.approx(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2), rel=1e-6)


def test_group_advantages_normalise_within_each_group_and_equal_rewards_give_zero():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    got = group_advantages(rewards, group_size=4, eps=1e-4).tolist()
    group = rewards[:4].tolist()
    mean, std = statistics.fmean(group), statistics.pstdev(group)
    assert got[:4] == pytest.approx([(r - mean) / (std + 1e-4) for r in group], rel=1e-5)
    assert got[4:] == [0.0] * 4  # all equal: no signal


def test_gae_matches_a_per_sequence_recursion():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    spans = [(1, 5), (0, 7), (3, 4)]  # [start, end) of each row's completion tokens
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, (a, b) in enumerate(spans):
        mask[row, a:b] = True
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, (a, b) in enumerate(spans):
        r, v = rewards[row, a:b].tolist(), values[row, a:b].tolist()
        expected, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            next_value = v[t + 1] if t + 1 < len(r) else 0.0  # the episode ends after the last token
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            expected[t] = running
        assert advantages[row, a:b].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert returns[row, a:b].tolist() == pytest.approx([e + x for e, x in zip(expected, v)], rel=1e-5, abs=1e-6)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_gae_steps_over_the_gaps_between_an_agents_replies():
    """Positions outside the mask (tool results between two replies) are no steps: the recursion runs over
    the masked tokens alone, the last token of a reply bootstrapping from the first of the next."""
    torch.manual_seed(1)
    rewards, values = torch.randn(2, 9), torch.randn(2, 9)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        steps = mask[row].nonzero().flatten().tolist()
        r, v = rewards[row, steps].tolist(), values[row, steps].tolist()
        expected, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            running = r[t] + gamma * (v[t + 1] if t + 1 < len(r) else 0.0) - v[t] + gamma * lam * running
            expected[t] = running
        assert advantages[row, steps].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert returns[row, steps].tolist() == pytest.approx([e + x for e, x in zip(expected, v)], rel=1e-5, abs=1e-6)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_ppo_whitening_spans_every_process():
    """Two ranks (threads here, meeting at a real barrier as an all-reduce does) with shards of different
    sizes and scales get exactly the whitening of the shards put together, not each its own."""
    torch.manual_seed(2)
    shards = [(torch.randn(2, 9) * 3 + 1, torch.rand(2, 9) > 0.2), (torch.randn(3, 5), torch.rand(3, 5) > 0.5)]
    barrier, pending, results = threading.Barrier(2), [None, None], [None, None]

    def all_reduce_sum(rank):
        def reduce(x):
            pending[rank] = x.clone()
            barrier.wait()
            total = pending[0] + pending[1]
            barrier.wait()  # both have read before either overwrites its slot
            return total
        return reduce

    def rank_main(rank):
        results[rank] = whiten(*shards[rank], all_reduce_sum=all_reduce_sum(rank))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = torch.cat([v[m] for v, m in shards])
    for (values, mask), result in zip(shards, results):
        expected = (values - together.mean()) / together.std(correction=0)
        assert torch.allclose(result[mask], expected[mask], atol=1e-5) and (result[~mask] == 0).all()
        assert not torch.allclose(result[mask], whiten(values, mask)[mask], atol=1e-2)  # the per-shard answer


def test_token_and_sequence_aggregation_and_the_overlong_penalty():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx(1 + 2 + 3 + 4)  # / 4 tokens by the loop
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(2 + 4)  # / 2 sequences by the loop
    lengths = torch.tensor([10, 12, 13, 16, 20])
    assert overlong_penalty(lengths, max_length=20, buffer=8).tolist() == pytest.approx([0, 0, -1 / 8, -4 / 8, -1])
    assert overlong_penalty(lengths, max_length=20, buffer=0).tolist() == [0.0] * 5


def test_the_training_layout_predicts_each_completion_token_from_the_one_before():
    prompts, completions = [[5, 6, 7], [8]], [[9, 2], [10, 11, 12, 2]]
    inputs, targets, lengths = training_layout(prompts, completions, pad_id=0)
    assert lengths.tolist() == [5, 5] and inputs.tolist() == [[5, 6, 7, 9], [8, 10, 11, 12]]
    assert targets.tolist() == [[-100, -100, 9, 2], [10, 11, 12, 2]]
    # An agent's completion: reply, tool result, reply; only the replies are targets.
    inputs, targets, lengths = training_layout([[5, 6]], [[9, 2, 30, 31, 10, 2]], pad_id=0, masks=[[1, 1, 0, 0, 1, 1]])
    assert inputs.tolist() == [[5, 6, 9, 2, 30, 31, 10]]
    assert targets.tolist() == [[-100, 9, 2, -100, -100, 10, 2]]


@pytest.mark.parametrize("algo", ["grpo", "cispo", "ppo"])
def test_the_stage_loss_matches_an_independent_computation(algo):
    torch.manual_seed(0)
    model = random_model(tiny_config(), seed=0)
    args = build_parser().parse_args(["rl", "--data", "x", "--out", "x", "--algo", algo, "--temperature", "0.7",
                                      *(["--critic", "shared"] if algo == "ppo" else ["--beta", "0.3"])])
    s = settings_from_args(args)
    if algo == "ppo":
        add_value_model(model, "shared")
        torch.nn.init.normal_(model.value_head.weight, std=0.1)
    inputs = torch.randint(3, 320, (3, 8))
    targets = torch.full((3, 8), -100)  # completions of 6, 2 and 3 tokens; each target is the next input
    targets[0, 2:7], targets[0, 7] = inputs[0, 3:8], 2
    targets[1, 4:6], targets[2, 1:4] = inputs[1, 5:7], inputs[2, 2:5]
    mask = targets != -100
    batch = {"inputs": inputs, "targets": targets, "old_logps": -torch.rand(3, 8) * 5 * mask,
             "advantages": torch.randn(3, 8) * mask, "ref_logps": -torch.rand(3, 8) * 5 * mask,
             "old_values": torch.randn(3, 8) * mask, "returns": torch.randn(3, 8) * mask,
             "stat_reward": torch.tensor(0.25)}
    loss_sum, units, metrics = PolicyLoss(s)(model, batch)

    with torch.no_grad():  # independently, token by token in float64
        out = model(inputs)
        logits = out.logits.double() / 0.7
        values = model.value_head(out.hidden_states).squeeze(-1).double() if algo == "ppo" else None
    per_row = []
    for row in range(3):
        terms = []
        for t in range(8):
            if targets[row, t] == -100:
                continue
            logp = torch.log_softmax(logits[row, t], -1)[targets[row, t]].item()
            old, adv, ref = (batch[k][row, t].item() for k in ("old_logps", "advantages", "ref_logps"))
            ratio = math.exp(logp - old)
            if algo == "cispo":
                term = -min(max(ratio, 1 - s.clip_low), 1 + s.clip_high) * adv * logp
            else:
                term = -min(ratio * adv, min(max(ratio, 1 - s.clip_low), 1 + s.clip_high) * adv)
            if algo == "ppo":
                v, v_old, ret = (values[row, t].item(), *(batch[k][row, t].item() for k in ("old_values", "returns")))
                v_clipped = v_old + min(max(v - v_old, -s.value_clip), s.value_clip)
                term += s.vf_coef * 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            else:
                term += s.beta * (math.exp(ref - logp) - (ref - logp) - 1)
            terms.append(term)
        per_row.append(terms)
    if s.loss_agg == "sequence":
        want, want_units = sum(sum(t) / len(t) for t in per_row), 3
    else:
        want, want_units = sum(sum(t) for t in per_row), int(mask.sum())
    assert (algo, s.loss_agg) in (("grpo", "sequence"), ("cispo", "token"), ("ppo", "token"))
    assert units.item() == want_units and loss_sum.item() == pytest.approx(want, rel=1e-4)
    assert metrics["reward"].item() == 0.25  # the rollout's statistics come out as metrics


# ----------------------------------------------------------------------------------------------
# Rollouts on a tiny model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The synthetic RL prompts (prepared), a tokenizer, a tiny random checkpoint and a reward file."""
    folder = tmp_path_factory.mktemp("rl")
    synthesize(folder / "synth", size="tiny")
    train_tokenizer([folder / "synth" / "sft.jsonl"], vocab_size=400, out_dir=folder / "tok")
    tokenizer = Tokenizer.load(folder / "tok")
    torch.manual_seed(0)
    save_checkpoint(NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False), folder / "init",
                    tokenizer=tokenizer)
    prepare([folder / "synth" / "rl.jsonl"], folder / "tok", folder / "prompts",
            PrepareOptions(kind="rl", seq_len=64, val_fraction=0.0), verbose=False)
    (folder / "digits.py").write_text(DIGITS_REWARD)
    return folder


def rl_args(workdir, out, *extra):
    return ["rl", "--data", str(workdir / "prompts"), "--init-from", str(workdir / "init"), "--out", str(out),
            "--device", "cpu", "--batch-size", "4", "--num-generations", "4", "--max-new-tokens", "12",
            "--warmup-steps", "1", "--reward", str(workdir / "digits.py") + ":digits", *map(str, extra)]


def stage_for(workdir, tmp_path, reward_fn, *extra):
    """The RL stage as the loop gets it, for a fresh copy of the tiny model."""
    args = build_parser().parse_args(rl_args(workdir, tmp_path, *extra))
    tokenizer = Tokenizer.load(workdir / "tok")
    rows = open_rows(workdir / "prompts", "train", load_manifest(workdir / "prompts"), tokenizer.pad_id)
    model = load_model(workdir / "init", dtype=torch.float32)
    torch.manual_seed(0)
    inputs = StageInputs(args, rows, None, model, tokenizer, Distributed(), torch.device("cpu"), workdir / "prompts")
    return make_stage(inputs, settings_from_args(args), reward_fn), model


def characters(prompts, completions, samples):
    """A reward that always differs between samples: the answer's length."""
    return torch.tensor([len(c) / 10 for c in completions]), {"chars": torch.tensor([len(c) / 10 for c in completions])}


def test_the_first_pass_has_a_ratio_of_one_and_a_later_minibatch_is_clipped(workdir, tmp_path):
    stage, model = stage_for(workdir, tmp_path, characters, "--clip-low", 0.05, "--clip-high", 0.05,
                             "--ppo-epochs", 2, "--minibatches", 2)
    source = stage.batch_source
    first = source.next_batches(2)  # the first minibatch, as 2 micro-batches
    assert len(first) == 2 and len(source.plan) == 3  # 2 passes x 2 minibatches per rollout
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    units = sum(stage.count_fn(b) for b in first)
    for batch in first:
        loss_sum, _, metrics = stage.loss_fn(model, batch)
        assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5)
        assert metrics["approx_kl_rollout"].item() < 1e-9 and metrics["clip_fraction"].item() == 0.0
        (loss_sum / units).backward()
    optimizer.step()
    later = [stage.loss_fn(model, batch)[2] for batch in source.next_batches(1)]
    assert later[0]["clip_fraction"].item() > 0.05
    assert abs(later[0]["ratio"].item() - 1) > 1e-3 and later[0]["approx_kl_rollout"].item() > 1e-4


def test_dapo_replaces_groups_whose_rewards_are_all_equal(workdir, tmp_path):
    def flat_for_arithmetic(prompts, completions, samples):
        """Equal rewards (1.0) for every arithmetic prompt; varied ones for the others."""
        values = [1.0 if re.fullmatch(r"-?\d+", s["gt"]) else len(c) / 10 for c, s in zip(completions, samples)]
        return torch.tensor(values), {}

    stage, _ = stage_for(workdir, tmp_path, flat_for_arithmetic, "--algo", "grpo")
    batch = stage.batch_source.next_batches(1)[0]
    groups = stage.batch_source.groups
    assert any(not g.informative for g in groups)  # GRPO keeps them, with zero advantages
    advantages = stage.batch_source.data["advantages"].view(len(groups), 4, -1)
    for group, adv in zip(groups, advantages):
        assert (adv.abs().sum() == 0) == (not group.informative)
    assert batch["stat_uniform_groups"].item() > 0

    stage, _ = stage_for(workdir, tmp_path, flat_for_arithmetic, "--algo", "dapo", "--max-resample", 8,
                         "--overlong-buffer", 0)  # the length penalty would make every group informative
    batch = stage.batch_source.next_batches(1)[0]
    groups = stage.batch_source.groups
    assert len(groups) == 4 and all(g.informative for g in groups)
    assert not any(re.fullmatch(r"-?\d+", g.record["gt"]) for g in groups)
    assert batch["stat_uniform_groups"].item() > 0 and batch["stat_uninformative_kept"].item() == 0
    assert stage.batch_source.sampler.cursor > 1  # it drew more prompts to replace the dropped groups


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPY = '''"""Run nanomind, then save this process's final weights (all of them: the value model too)."""
import os, sys, torch
import nanomind.trainer as trainer
from nanomind.cli import main

original = trainer.train

def train_and_save(stage, model, *args, **kwargs):
    metrics = original(stage, model, *args, **kwargs)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
    return metrics

trainer.train = train_and_save
main(sys.argv[2:])
'''


def test_two_ddp_processes_end_with_identical_weights_value_model_included(workdir, tmp_path):
    """Each process samples other prompts with another seed, so only the gradient all-reduce keeps them
    equal: a forward that bypasses DDP (MiniMind's RL scripts) ends with different weights here."""
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), str(tmp_path / "spy.py"), str(tmp_path),
                             *rl_args(workdir, tmp_path / "run", "--algo", "ppo", "--critic", "separate",
                                      "--num-generations", 2, "--batch-size", 2, "--max-new-tokens", 8,
                                      "--max-steps", 4, "--lr", 1e-2, "--ppo-epochs", 1)],
                            check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("critic.") for k in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    init = load_model(workdir / "init").state_dict()
    assert max((ranks[0][k] - init[k]).abs().max() for k in init) > 1e-3  # it trained
    assert ranks[0]["critic.lm_head.weight"].abs().max() > 0  # the value head too (it starts at zero)
    # The result is a plain checkpoint of the policy; the critic is saved beside it.
    final = load_model(tmp_path / "run" / "model").state_dict()
    assert all(torch.equal(final[k], ranks[0][k]) for k in final) and final.keys() == init.keys()
    assert (tmp_path / "run" / "model" / VALUE_FILE).exists()


def metrics_of(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_a_resume_on_a_rollout_boundary_continues_exactly(workdir, tmp_path):
    common = ("--algo", "dapo", "--beta", 0.1, "--lr", 1e-2, "--schedule", "constant", "--save-every", 4)
    nanomind(rl_args(workdir, tmp_path / "whole", *common, "--max-steps", 8))
    nanomind(rl_args(workdir, tmp_path / "resumed", *common, "--max-steps", 4))
    nanomind(rl_args(workdir, tmp_path / "resumed", *common, "--max-steps", 8, "--resume"))
    whole, resumed = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "resumed")
    assert len(whole) == len(resumed) == 8 and whole[4]["kl"] > 0
    for key in ("loss", "reward", "kl", "clip_fraction"):
        assert [m[key] for m in resumed] == [m[key] for m in whole], key


def test_grpo_raises_the_reward_of_a_tiny_model(workdir, tmp_path):
    nanomind(rl_args(workdir, tmp_path / "run", "--algo", "grpo", "--lr", 1e-2, "--schedule", "constant",
                     "--max-steps", 32))
    metrics = metrics_of(tmp_path / "run")
    rewards = [m["reward"] for m in metrics[::4]]  # one value per rollout (4 steps each)
    assert sum(rewards[-2:]) / 2 > 2 * sum(rewards[:2]) / 2 + 0.05, rewards
    assert all(0 <= m["clip_fraction"] <= 1 and m["entropy"] > 0 for m in metrics)
    assert {"reward_digits", "response_length", "truncated", "uniform_groups"} <= metrics[0].keys()
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "model" / VALUE_FILE).exists()  # no value model outside PPO


# ----------------------------------------------------------------------------------------------
# Agent RL: multi-turn tool trajectories


def call(expression: str) -> str:
    body = json.dumps({"name": "calculate_math", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


AGENT_CASES = {  # question -> (gt, the replies the scripted model writes, turn by turn)
    "What is 256 * 37?": (["9472"], [call("256 * 37"), "256 * 37 = 9472."]),
    "Wrong": (["36"], [call("12 * 3"), "It is 5."]),
    "Malformed": (["9472"], ['<tool_call>\n{"name": "calculate_math", "arguments": {"expression": </tool_call>',
                             "Sorry."]),
    "Unclosed": (["9472", "1"], ['<tool_call>\n{"name": "calculate_math"', "Sorry."]),
    "Two": (["42", "5"], [call("6 * 7"), call("2 + 3"), "6 * 7 = 42 and 2 + 3 = 5."]),
    "Loop": (["2"], [call("1 + 1")] * 3),
}


def agent_script(text: str) -> str:
    """The reply to the case's question after as many tool results as the conversation holds."""
    question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL).group(1)
    replies = AGENT_CASES[question][1]
    return replies[min(len(re.findall("<tool_response>", text)), len(replies) - 1)]


@pytest.fixture(scope="module")
def agent_data(workdir):
    """The agent cases (prepared as agent data) and the synthetic agent_rl.jsonl (prepared)."""
    raw = workdir / "agent_cases.jsonl"
    raw.write_text("".join(json.dumps({"conversations": [{"role": "system", "content": "Use the tools."},
                                                         {"role": "user", "content": question},
                                                         {"role": "assistant", "content": ""}], "gt": gt}) + "\n"
                           for question, (gt, _) in AGENT_CASES.items()))
    for source, name in ((raw, "cases"), (workdir / "synth" / "agent_rl.jsonl", "agent")):
        prepare([source], workdir / "tok", workdir / name, PrepareOptions(kind="agent", seq_len=64, val_fraction=0.0),
                verbose=False)
    return workdir


@pytest.fixture
def scripted(monkeypatch, workdir):
    """Rollouts by the scripted model (run_agents itself, every tool call run for real); the training
    forwards, log-probabilities included, by the real tiny model."""
    tokenizer = Tokenizer.load(workdir / "tok")
    actor = ScriptedModel(tokenizer, agent_script)
    monkeypatch.setattr(rl, "run_agents", lambda model, *args, **kwargs: run_agents(actor, *args, **kwargs))
    return tokenizer


def agent_stage(workdir, tmp_path, reward_fn=None, *extra, **agent_settings):
    """The RL stage on the agent cases, for a fresh copy of the tiny model (later flags win)."""
    args = build_parser().parse_args(["rl", "--data", str(workdir / "cases"), "--init-from", str(workdir / "init"),
                                      "--out", str(tmp_path), "--device", "cpu", "--batch-size", str(len(AGENT_CASES)),
                                      "--num-generations", "2", "--max-new-tokens", "120", "--max-prompt-len", "1000",
                                      *map(str, extra)])
    vars(args).update({"max_total_len": 1400, **agent_settings})  # the agent options, whether or not the CLI has them
    assert data_kind(args) == "agent"  # a folder prepared as agent data
    tokenizer = Tokenizer.load(workdir / "tok")
    rows = open_rows(workdir / "cases", "train", load_manifest(workdir / "cases"), tokenizer.pad_id)
    model = load_model(workdir / "init", dtype=torch.float32)
    s = dataclasses.replace(settings_from_args(args), agent=True)
    inputs = StageInputs(args, rows, None, model, tokenizer, Distributed(), torch.device("cpu"), workdir / "cases")
    return make_stage(inputs, s, reward_fn), model


def alternating(prompts, completions, samples):
    """0, 1, 0, 1, ...: the two samples of a (deterministic) group differ, so advantages are +-1."""
    values = torch.tensor([float(i % 2) for i in range(len(completions))])
    return values, {"alternating": values}


def test_agent_rollouts_train_exactly_the_models_tokens(agent_data, scripted, tmp_path):
    stage, model = agent_stage(agent_data, tmp_path, alternating, "--temperature", 0.7)
    source = stage.batch_source
    source.next_batches(1)
    trajectories = [t for g in source.groups for t in g.trajectories]
    batch = source._micro_batch(torch.arange(len(trajectories)))  # the whole rollout, in group order
    assert {g.record["conversations"][-1]["content"] for g in source.groups} == set(AGENT_CASES)

    G, eos = 2, scripted.eos_id
    with torch.no_grad():
        for row, t in enumerate(trajectories):
            n = max(i for i, m in enumerate(t.mask) if m) + 1  # up to the last reply (all of it here)
            assert n == len(t.token_ids) and t.tool_results  # every case ran a tool
            assert batch["inputs"][row, :n - 1].tolist() == t.token_ids[:n - 1]
            want = [t.token_ids[k + 1] if t.mask[k + 1] else -100 for k in range(n - 1)]
            got = batch["targets"][row].tolist()
            assert got[:n - 1] == want and set(got[n - 1:]) <= {-100}
            # The trained tokens are the replies with their end-of-turn tokens; never a tool result.
            trained = [i for i in got if i != -100]
            assert trained == [i for i, m in zip(t.token_ids, t.mask) if m] and trained.count(eos) == len(t.replies)
            assert scripted.decode(trained) == "".join(r + "<|im_end|>" for r in t.replies)
            # The rollout log-probs: the model on the trajectory alone, at the sampling temperature.
            logits = model(torch.tensor([t.token_ids])).logits[0].double() / 0.7
            for k in range(n - 1):
                if t.mask[k + 1]:
                    logp = torch.log_softmax(logits[k], -1)[t.token_ids[k + 1]].item()
                    assert batch["old_logps"][row, k].item() == pytest.approx(logp, abs=2e-4)

    # The loss on the batch, with the rollout log-probs moved so the ratios are not 1, against a
    # computation token by token over each trajectory's own model tokens.
    mask = batch["targets"] != -100
    torch.manual_seed(0)
    batch["old_logps"] = batch["old_logps"] - 0.3 * torch.rand(mask.shape) * mask
    loss_sum, units, _ = stage.loss_fn(model, batch)
    advantage = 0.5 / (0.5 + 1e-4)  # rewards 0, 1 in each group: mean 0.5, population std 0.5
    s, want = stage.loss_fn.s, 0.0
    with torch.no_grad():
        for row, t in enumerate(trajectories):
            a = advantage if row % G else -advantage
            logits = model(torch.tensor([t.token_ids])).logits[0].double() / 0.7
            terms = []
            for k in range(len(t.token_ids) - 1):
                if t.mask[k + 1]:
                    ratio = math.exp(torch.log_softmax(logits[k], -1)[t.token_ids[k + 1]].item()
                                     - batch["old_logps"][row, k].item())
                    terms.append(-min(ratio * a, min(max(ratio, 1 - s.clip_low), 1 + s.clip_high) * a))
            want += sum(terms) / len(terms)
    assert units.item() == len(trajectories) and loss_sum.item() == pytest.approx(want, rel=1e-4)

    # The agent metrics: per trajectory (the same six cases twice).
    calls = [len(AGENT_CASES[q][1]) - 1 if q != "Loop" else 3 for q in AGENT_CASES]  # 1, 1, 1, 1, 2, 3
    turns = [len(AGENT_CASES[q][1]) for q in AGENT_CASES]
    assert batch["stat_tool_calls"].item() == pytest.approx(sum(calls) / 6)
    assert batch["stat_invalid_call_share"].item() == pytest.approx(2 / sum(calls))  # Malformed, Unclosed
    assert batch["stat_turns"].item() == pytest.approx(sum(turns) / 6)
    assert batch["stat_end_answer"].item() == pytest.approx(5 / 6) and batch["stat_end_max_turns"].item() == \
        pytest.approx(1 / 6) and batch["stat_end_length"].item() == batch["stat_end_context"].item() == 0
    assert batch["stat_response_length"].item() == pytest.approx(sum(sum(t.mask) for t in trajectories) / 12)


def test_agent_rewards_judge_the_final_answer_and_every_turns_calls(agent_data, scripted, tmp_path):
    stage, _ = agent_stage(agent_data, tmp_path)  # the default rewards: math=1, tool_calls=0.5
    source = stage.batch_source
    source.next_batches(1)
    by_question = {g.record["conversations"][-1]["content"]: g for g in source.groups}
    rewards = {q: g.rewards.tolist() for q, g in by_question.items()}
    assert rewards == {
        "What is 256 * 37?": [1.5, 1.5],  # the right call and the right answer
        "Two": [1.5, 1.5],  # two calls in two turns (an answer-only text would show none), both values
        "Wrong": [0.5, 0.5],  # the right call, a wrong answer
        "Malformed": [0.0, 0.0],  # an invalid call scores as none: 1 - max(1 missing, 1 invalid) / 1 = 0
        "Unclosed": [0.0, 0.0],  # 1 - max(2 missing, 1 invalid) / 2 = 0
        "Loop": [-0.5, -0.5],  # three calls for one value, and no answer
    }
    for group in by_question.values():
        record = group.record
        for t, text in zip(group.trajectories, group.texts):
            # The rewards read the replies' text: its answer is the trajectory's, and its calls are all of
            # them, as run_agents ran them (tool results, which can quote tool-call tags, are left out).
            assert answer_text(text) == t.answer and "<tool_response>" not in text
            expected = len(record["gt"])
            errors = max(expected - t.valid_calls, t.invalid_calls, 0) + max(t.valid_calls - expected, 0)
            want = max(-1.0, 1 - errors / expected)
            assert tool_call_reward(group.prompt, text, record) == want
            assert math_reward(group.prompt, text, record) == math_reward("", t.answer, record)
    assert "<tool_call>" in by_question["Unclosed"].trajectories[0].tool_results[0]  # why they are left out


def test_agent_trajectories_end_at_max_total_len_and_ppo_steps_over_tool_results(agent_data, scripted, tmp_path):
    tokenizer = scripted
    schemas = tool_schemas(builtin_tools())
    longest = max(len(tokenizer.encode(render_prompt(tokenizer, r, tools=schemas)))
                  for r in open_rows(agent_data / "cases", "train", load_manifest(agent_data / "cases"), 0).records)
    # Room for one reply; a second would not fit after the first reply and its tool result.
    stage, _ = agent_stage(agent_data, tmp_path, None, "--max-prompt-len", longest, max_total_len=longest + 130)
    source = stage.batch_source
    source.next_batches(1)
    trajectories = [t for g in source.groups for t in g.trajectories]
    assert all(t.end == "context" and len(t.replies) == 1 for t in trajectories)
    assert int(source.lengths.max()) <= longest + 130  # the unread tool results are not in the rows
    targets = source.data["targets"]
    assert all(targets[row][targets[row] != -100][-1] == tokenizer.eos_id for row in range(len(targets)))

    # PPO over several turns: with a zero value head (its start) and no KL the returns are the reward
    # discounted by lambda per MODEL token, so the tool results between replies do not count as steps.
    stage, _ = agent_stage(agent_data, tmp_path, None, "--algo", "ppo", "--critic", "shared", "--kl-coef", 0,
                           "--num-generations", 1, "--minibatches", 1)
    source = stage.batch_source
    source.next_batches(1)
    data, lam = source.data, stage.loss_fn.s.lam
    for row, group in enumerate(source.groups):
        mask = data["targets"][row] != -100
        n = int(mask.sum())
        assert n == sum(group.trajectories[0].mask) and len(group.trajectories[0].replies) >= 2
        reward = group.rewards[0].item()
        assert data["returns"][row][mask].tolist() == pytest.approx([reward * lam ** (n - 1 - j) for j in range(n)],
                                                                    abs=1e-5)
        assert (data["returns"][row][~mask] == 0).all() and (data["advantages"][row][~mask] == 0).all()


def test_agent_grpo_runs_end_to_end_on_the_synthetic_agent_data(agent_data, tmp_path):
    """`nanomind rl` on a folder prepared as agent data rolls out with tools and logs the agent metrics."""
    nanomind(["rl", "--algo", "grpo", "--data", str(agent_data / "agent"), "--init-from", str(agent_data / "init"),
              "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "2", "--num-generations", "2",
              "--max-new-tokens", "16", "--max-prompt-len", "1000", "--max-steps", "4", "--warmup-steps", "1",
              "--lr", "1e-3"])
    metrics = metrics_of(tmp_path / "run")
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)
    keys = {"reward_math", "reward_tool_calls", "tool_calls", "invalid_call_share", "turns", "end_answer",
            "end_max_turns", "end_length", "end_context"}
    assert keys <= metrics[0].keys()
    assert sum(metrics[0][f"end_{r}"] for r in ("answer", "max_turns", "length", "context")) == pytest.approx(1)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # Raw JSONL is agent data with --agent (prepared as such); a prepared folder says what it holds.
    args = build_parser().parse_args(["rl", "--data", str(agent_data / "synth" / "agent_rl.jsonl"), "--out", "x"])
    assert data_kind(args) == "rl" and data_kind(argparse_namespace(args, agent=True)) == "agent"
    assert data_kind(argparse_namespace(args, data=[str(agent_data / "prompts")])) == "rl"


def test_agent_rl_under_two_ddp_processes_ends_with_identical_weights(agent_data, tmp_path):
    """Trajectories differ in turns and length from process to process; the training steps must still
    line up one to one across processes (a mismatch hangs the all-reduce) and keep the weights equal."""
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), str(tmp_path / "spy.py"), str(tmp_path),
                             "rl", "--algo", "grpo", "--data", str(agent_data / "agent"),
                             "--init-from", str(agent_data / "init"), "--out", str(tmp_path / "run"), "--device", "cpu",
                             "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "16",
                             "--max-prompt-len", "1000", "--max-steps", "3", "--warmup-steps", "1", "--lr", "1e-2"],
                            check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    init = load_model(agent_data / "init").state_dict()
    assert max((ranks[0][k] - init[k]).abs().max() for k in init) > 1e-4  # it trained
    assert len(metrics_of(tmp_path / "run")) == 3 and "tool_calls" in metrics_of(tmp_path / "run")[0]


def argparse_namespace(args, **changes):
    return type(args)(**{**vars(args), **changes})
