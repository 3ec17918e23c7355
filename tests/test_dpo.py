"""DPO: each loss matches its formula, pairs batch correctly, a precomputed reference trains exactly like
a live one, a stale reference cache is never reused, and a tiny model learns the preferences."""

import json
import math

import pytest
import torch
from conftest import random_model, tiny_config

from nanomind.checkpoint import save_checkpoint
from nanomind.cli import main as nanomind
from nanomind.dpo import PreferenceLoss, dpo_loss
from nanomind.model import NanoMind
from nanomind.prepare import PrepareOptions, load_manifest, open_rows, prepare
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_each_loss_matches_its_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -9.0, -4.0], [-5.0, -2.0, -4.5], [-4.0, -6.0, -4.0],
                                               [-4.0, -4.0, -3.0]))
    margins = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    beta, ls = 0.5, 0.2
    expected = {
        ("sigmoid", 0.0): [-logsigmoid(beta * m) for m in margins],
        ("sigmoid", ls): [-(1 - ls) * logsigmoid(beta * m) - ls * logsigmoid(-beta * m) for m in margins],
        ("ipo", 0.0): [(m - 1 / (2 * beta)) ** 2 for m in margins],
        ("hinge", 0.0): [max(0.0, 1 - beta * m) for m in margins],
    }
    for (loss_type, smoothing), want in expected.items():
        got = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
        assert got.tolist() == pytest.approx(want, abs=1e-6), loss_type


@pytest.mark.parametrize("moe", [False, True])
def test_the_stage_loss_scores_assistant_tokens_and_adds_rpo_and_the_balance_loss(moe):
    policy, reference = random_model(tiny_config(moe=moe), seed=0), random_model(tiny_config(moe=moe), seed=1)
    torch.manual_seed(2)
    inputs = torch.randint(0, 320, (4, 7))  # 2 pairs: rows 0-1 chosen, rows 2-3 rejected
    targets = torch.randint(0, 320, (4, 7))
    targets[:, :3] = -100  # the prompt
    targets[1, 5:] = -100  # padding
    beta, alpha = 0.3, 0.7

    def logps(model):  # independently: log-softmax, then pick and add the target tokens one by one
        logits = model(inputs).logits.double()
        return [sum(torch.log_softmax(logits[r, t], -1)[targets[r, t]].item()
                    for t in range(7) if targets[r, t] != -100) for r in range(4)]

    pi, ref = logps(policy), logps(reference)
    want = 0.0
    for c, r in ((0, 2), (1, 3)):
        margin = (pi[c] - pi[r]) - (ref[c] - ref[r])
        want += -logsigmoid(beta * margin) + alpha * -pi[c] / (targets[c] != -100).sum().item()
    batch = {"inputs": inputs, "targets": targets}
    loss_fn = PreferenceLoss(beta, "sigmoid", rpo_alpha=alpha, reference=reference)
    loss_sum, pairs, metrics = loss_fn(policy, batch)
    if moe:
        want += policy.config.router_aux_loss_coef * policy(inputs).aux_loss.item() * 2
    assert pairs.item() == 2 and loss_sum.item() == pytest.approx(want, rel=1e-5)
    rewards = [beta * (pi[i] - ref[i]) for i in range(4)]
    assert metrics["chosen_reward"].item() == pytest.approx((rewards[0] + rewards[1]) / 2, rel=1e-5)
    assert metrics["reward_accuracy"].item() == ((rewards[0] > rewards[2]) + (rewards[1] > rewards[3])) / 2
    # The same loss from log-probabilities the batch carries (a precomputed reference).
    carried = {**batch, "reference_logps": torch.tensor([[ref[0], ref[2]], [ref[1], ref[3]]])}
    assert PreferenceLoss(beta, "sigmoid", rpo_alpha=alpha)(policy, carried)[0].item() == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic DPO pairs, a tokenizer, and two tiny starting checkpoints."""
    folder = tmp_path_factory.mktemp("dpo")
    synthesize(folder / "synth", size="tiny")
    train_tokenizer([folder / "synth" / "sft.jsonl"], vocab_size=400, out_dir=folder / "tok")
    tokenizer = Tokenizer.load(folder / "tok")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False)
        save_checkpoint(model, folder / f"init{seed}", tokenizer=tokenizer)
    return folder


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows_trained_on_the_answers_only(workdir, tmp_path):
    tokenizer = Tokenizer.load(workdir / "tok")
    pairs = [("What is 2 plus 2?", "4", "It is five, I think, or maybe six."), ("你好", "你好！", "Hello")]
    with open(tmp_path / "pairs.jsonl", "w", encoding="utf-8") as f:
        for question, good, bad in pairs:
            user = {"role": "user", "content": question}
            f.write(json.dumps({"chosen": [user, {"role": "assistant", "content": good}],
                                "rejected": [user, {"role": "assistant", "content": bad}]}) + "\n")
    manifest = prepare([tmp_path / "pairs.jsonl"], workdir / "tok", tmp_path / "data",
                       PrepareOptions(kind="dpo", seq_len=64, val_fraction=0.0), verbose=False)
    rows = open_rows(tmp_path / "data", "train", manifest, tokenizer.pad_id)
    assert len(rows) == 2 and open_rows(tmp_path / "data", "val", manifest, tokenizer.pad_id) is None

    batch = rows.rows([1, 0])
    longest = len(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][2]}])))
    assert batch["inputs"].shape == batch["targets"].shape == (4, longest - 1)
    answers = [pairs[1][1], pairs[0][1], pairs[1][2], pairs[0][2]]
    for row, answer in enumerate(answers):
        targets = batch["targets"][row]
        trained = tokenizer.decode(targets[targets != -100].tolist())
        assert trained.endswith(answer + "<|im_end|>") and "user" not in trained, (row, trained)
        # Targets are the next inputs; padding (the tail of shorter rows) is never trained.
        kept = targets != -100
        assert torch.equal(targets[:-1][kept[:-1]], batch["inputs"][row, 1:][kept[:-1]])
        padding = batch["inputs"][row] == tokenizer.pad_id
        assert not kept[padding].any()
    assert (batch["inputs"][3] == tokenizer.pad_id).sum() == 0  # the longest row is not padded


def dpo_run(workdir, out, *extra, init="init0", steps=20):
    nanomind(["dpo", "--data", str(workdir / "synth" / "dpo.jsonl"), "--init-from", str(workdir / init),
              "--out", str(out), "--batch-size", "8", "--seq-len", "96", "--val-fraction", "0.1", "--lr", "3e-3",
              "--warmup-steps", "2", "--max-steps", str(steps), "--eval-every", str(steps), "--device", "cpu",
              *extra])
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def live_and_precomputed(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return dpo_run(workdir, out / "live"), dpo_run(workdir, out / "precomputed", "--precompute-ref"), out


def test_a_precomputed_reference_trains_exactly_like_a_live_one(live_and_precomputed):
    live, precomputed, out = live_and_precomputed
    assert (out / "precomputed" / "reference_logps.pt").exists() and not (out / "live" / "reference_logps.pt").exists()
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "val_loss", "val_reward_accuracy"):
        a = [m[key] for m in live if key in m]
        b = [m[key] for m in precomputed if key in m]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-4), key
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in precomputed], abs=1e-5)


def test_a_tiny_model_learns_to_prefer_the_chosen_answers(live_and_precomputed):
    live = live_and_precomputed[0]
    assert live[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    assert live[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert sum(m["loss"] for m in live[-5:]) / 5 < math.log(2) - 0.2
    assert live[-1]["val_reward_accuracy"] > 0.6 and live[-1]["val_reward_margin"] > 0


def test_a_reference_cache_is_reused_only_for_the_same_model_and_data(workdir, live_and_precomputed, tmp_path):
    out = live_and_precomputed[2] / "precomputed"
    cache = out / "reference_logps.pt"
    key = torch.load(cache, weights_only=True)["key"]
    written = cache.stat().st_mtime_ns

    def first_step(*args, **kwargs):
        return dpo_run(workdir, out, "--precompute-ref", *args, steps=1, **kwargs)[0]

    # Same model and data: the cache is read, not rewritten.
    assert first_step()["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert cache.stat().st_mtime_ns == written
    # Another starting model: a stale cache would give a nonzero margin at step 1.
    step = first_step(init="init1")
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5) and step["reward_margin"] == pytest.approx(0, abs=1e-5)
    other_model = torch.load(cache, weights_only=True)["key"]
    assert other_model != key
    # Other data (the evaluation pairs, prepared into the same run folder).
    nanomind(["dpo", "--data", str(workdir / "synth" / "eval_dpo.jsonl"), "--init-from", str(workdir / "init1"),
              "--out", str(out), "--batch-size", "8", "--seq-len", "96", "--val-fraction", "0.1",
              "--max-steps", "1", "--eval-every", "0", "--device", "cpu", "--precompute-ref"])
    cached = torch.load(cache, weights_only=True)
    assert cached["key"] not in (key, other_model)
    assert len(cached["logps"]["train"]) == len(open_rows(out / "prepared", "train", load_manifest(out / "prepared"),
                                                          0))


def test_dpo_without_a_starting_checkpoint_says_what_to_pass(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        nanomind(["dpo", "--data", str(workdir / "synth" / "dpo.jsonl"), "--tokenizer", str(workdir / "tok"),
                  "--out", str(tmp_path), "--device", "cpu"])
    assert "--init-from" in capsys.readouterr().err
