"""The shared training loop: it learns, resumes exactly after SIGKILL, agrees across DDP ranks, and
stops on NaN without touching the last good checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomind.builtin_text import write_builtin_jsonl
from nanomind.checkpoint import load_model
from nanomind.prepare import PrepareOptions, TokenStore, open_rows, prepare
from nanomind.tokenizer import Tokenizer, train_tokenizer
from nanomind.trainer import (Distributed, Stage, TrainSettings, TrainingError, latest_checkpoint,
                              learning_rate, token_loss, train)

TINY = ["--preset", "tiny", "--hidden-size", "64", "--num-layers", "2", "--intermediate-size", "128",
        "--head-dim", "16"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    write_builtin_jsonl(folder / "text.jsonl", 2500)
    train_tokenizer([folder / "text.jsonl"], vocab_size=400, out_dir=folder / "tok")
    prepare([folder / "text.jsonl"], folder / "tok", folder / "data",
            PrepareOptions(kind="pretrain", seq_len=64, val_fraction=0.05), verbose=False)
    return folder


def nanomind(*args, env=None):
    return [sys.executable, "-m", "nanomind", *map(str, args)]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def pretrain_args(prepared, out, *extra):
    return ["pretrain", "--data", prepared / "data", "--tokenizer", prepared / "tok", *TINY,
            "--batch-size", 8, "--lr", 3e-3, "--eval-every", 1000, "--out", out, *extra]


def test_a_tiny_model_learns_below_the_unigram_entropy(prepared, tmp_path):
    result = subprocess.run(nanomind(*pretrain_args(prepared, tmp_path / "run", "--max-steps", 60,
                                                    "--eval-every", 60)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    counts = Counter(np.asarray(TokenStore(prepared / "data", "train", manifest["dtype"]).tokens).tolist())
    total = sum(counts.values())
    unigram_entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert final["val_loss"] < 0.75 * unigram_entropy, (final["val_loss"], unigram_entropy)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


# `python KILL_AT WHERE ARGS` runs `nanomind ARGS` and SIGKILLs itself at WHERE, so the kill lands at
# the same point every time, with no test hook inside nanomind:
#   write-N  inside the write of checkpoint step-N: its files are all in the hidden temporary folder,
#            the rename that would publish them has not happened
#   step-N   after step N is logged (and its checkpoint, if any, written), before step N+1 starts
KILL_AT = """
import os, signal, sys
import nanomind.checkpoint, nanomind.trainer
from nanomind.cli import main

where, *argv = sys.argv[1:]
kind, n = where.split("-")
rename, schedule = nanomind.checkpoint._replace_directory, nanomind.trainer.learning_rate

def replace_directory(new, target):
    if kind == "write" and target.name == f"step-{int(n):06d}":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(new, target)

def learning_rate(step, *args, **kwargs):
    if kind == "step" and step == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return schedule(step, *args, **kwargs)

nanomind.checkpoint._replace_directory = replace_directory
nanomind.trainer.learning_rate = learning_rate
main(argv)
"""
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed process loses no printed line


@pytest.fixture
def kill_at(tmp_path) -> Path:
    (tmp_path / "kill_at.py").write_text(KILL_AT)
    return tmp_path / "kill_at.py"


def test_resume_after_sigkill_gives_the_same_losses_bitwise(prepared, tmp_path, kill_at):
    """Killed inside a checkpoint write, resumed, killed between steps, resumed: the same per-step
    losses as a run that was never interrupted, and no half-written checkpoint is ever read."""
    args = ("--max-steps", 12, "--save-every", 2, "--keep-last", 2)
    reference = subprocess.run(nanomind(*pretrain_args(prepared, tmp_path / "ref", *args)),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"

    def run(*command):
        return subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, timeout=600,
                              env=UNBUFFERED)

    def saved() -> list[str]:
        return sorted(p.name for p in checkpoints.iterdir())

    killed = run(kill_at, "write-6", *pretrain_args(prepared, run_dir, *args))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [unfinished] = checkpoints.glob(".step-000006.tmp-*")
    assert (unfinished / "model.safetensors").exists() and (unfinished / "trainer_state.pt").exists()
    assert saved() == [unfinished.name, "step-000002", "step-000004"] and len(losses(run_dir)) == 6

    killed = run(kill_at, "step-9", *pretrain_args(prepared, run_dir, *args, "--resume"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step-000004'} at step 4" in killed.stdout
    assert saved() == ["step-000006", "step-000008"]  # the leftover folder is gone; the last 2 are kept
    assert len(losses(run_dir)) == 9

    resumed = run("-m", "nanomind", *pretrain_args(prepared, run_dir, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoints / 'step-000008'} at step 8" in resumed.stdout
    assert saved() == ["step-000010", "step-000012"]
    assert losses(run_dir) == losses(tmp_path / "ref")  # bitwise: the same floats, not just close


def torchrun(*command) -> list[str]:
    """`torchrun --nproc_per_node 2 COMMAND`: two gloo processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), *map(str, command)]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the cores


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "ddp with layer drop"])
def test_two_gloo_processes_match_one_process_with_twice_the_batch(prepared, tmp_path, sharding):
    # With layer drop, some steps leave layer 1 without gradients: every rank must skip it alike.
    common = ("--max-steps", 4, "--eval-every", 4, "--grad-accum", 2,
              *(("--layer-drop", 0.5, "--layer-drop-layers", 1) if "layer drop" in sharding else ()))
    single = subprocess.run(nanomind(*pretrain_args(prepared, tmp_path / "one", *common, "--batch-size", 8)),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    sharded = ["--fsdp"] if sharding == "fsdp" else []
    ddp = subprocess.run(torchrun("-m", "nanomind", *pretrain_args(prepared, tmp_path / "two", *common, "--batch-size",
                                                                   4, *sharded)),
                         capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert np.allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), atol=1e-5, rtol=0)
    if "layer drop" in sharding:  # some of the steps did skip layer 1, and others not
        skipped = [json.loads(line)["layers_skipped"] for line in open(tmp_path / "two" / "metrics.jsonl")]
        assert 0 < sum(skipped) < len(skipped)
    one, two = (load_model(tmp_path / name / "model") for name in ("one", "two"))
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_an_fsdp_run_killed_and_resumed_gives_the_same_losses_bitwise(prepared, tmp_path, kill_at):
    """FSDP2 over 2 gloo processes: sharded weights and optimizer state go into a normal full
    checkpoint and come back on resume, bit for bit."""
    args = ("--max-steps", 6, "--save-every", 3, "--batch-size", 4, "--fsdp")
    env = {**ONE_THREAD, **UNBUFFERED}
    reference = subprocess.run(torchrun("-m", "nanomind", *pretrain_args(prepared, tmp_path / "ref", *args)),
                               capture_output=True, text=True, timeout=600, env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    killed = subprocess.run(torchrun(kill_at, "step-4", *pretrain_args(prepared, run_dir, *args)),
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode != 0 and len(losses(run_dir)) == 4, killed.stderr[-3000:]
    resumed = subprocess.run(torchrun("-m", "nanomind", *pretrain_args(prepared, run_dir, *args, "--resume")),
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000003'} at step 3" in resumed.stdout
    assert losses(run_dir) == losses(tmp_path / "ref")

    # What --fsdp saves is a normal, whole checkpoint: it loads strictly into a plain model.
    load_model(run_dir / "checkpoints" / "step-000003")
    final, reference_final = (load_model(folder / "model").state_dict() for folder in (run_dir, tmp_path / "ref"))
    assert all(torch.equal(final[name], reference_final[name]) for name in reference_final)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    from conftest import tiny_config
    from nanomind.model import NanoMind

    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    calls = {"n": 0}

    def loss_that_diverges(model, batch):
        loss_sum, n, metrics = token_loss(model, batch)
        calls["n"] += 1
        return (loss_sum * float("nan") if calls["n"] > 3 else loss_sum), n, metrics

    model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False)
    settings = TrainSettings(out=tmp_path / "run", batch_size=4, max_steps=10, save_every=2, eval_every=0)
    with pytest.raises(TrainingError, match=r"became nan at step 4.*step-000002"):
        train(Stage("test", rows, None, loss_that_diverges), model, tokenizer, settings, Distributed(),
              torch.device("cpu"))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000002"
    load_model(latest_checkpoint(tmp_path / "run" / "checkpoints"))  # intact and loadable


def test_learning_rate_schedules():
    assert learning_rate(0, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert learning_rate(99 + 1, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert learning_rate(50, 100, 1.0, 10, "wsd", 0.1) == 1.0
    assert learning_rate(100, 100, 1.0, 10, "wsd", 0.1) == pytest.approx(0.1)
    # Under a time budget the further of the two progresses counts.
    assert learning_rate(20, 10**12, 1.0, 10, "cosine", 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert learning_rate(90, 100, 1.0, 10, "cosine", 0.1, time_fraction=0.5) < 0.2


def test_a_time_boxed_run_decays_its_learning_rate_by_the_deadline(prepared, tmp_path):
    from conftest import tiny_config
    from nanomind.model import NanoMind

    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False)
    settings = TrainSettings(out=tmp_path / "run", batch_size=4, epochs=1000, time_budget=3.0, lr=1e-3,
                             warmup_steps=2, min_lr_ratio=0.1, eval_every=0, save_every=0)
    started = time.perf_counter()
    train(Stage("test", rows, None, token_loss), model, tokenizer, settings, Distributed(), torch.device("cpu"))
    assert time.perf_counter() - started < 30
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    # 1000 epochs would keep a step-based cosine at its peak; the budget's share brings it down to the floor.
    assert len(lrs) > 5 and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] < 0.2e-3


def test_a_resumed_time_boxed_run_continues_its_clock_and_schedule(prepared, tmp_path, monkeypatch):
    from conftest import tiny_config
    from nanomind.model import NanoMind
    import nanomind.trainer

    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    settings = TrainSettings(out=tmp_path / "run", batch_size=4, epochs=1000, time_budget=4.0, lr=1e-3,
                             warmup_steps=2, eval_every=0, save_every=4, resume=True)
    schedule = nanomind.trainer.learning_rate

    def crash_at_step_14(step, *args, **kwargs):
        if step == 14:
            raise KeyboardInterrupt
        return schedule(step, *args, **kwargs)

    monkeypatch.setattr(nanomind.trainer, "learning_rate", crash_at_step_14)
    with pytest.raises(KeyboardInterrupt):
        train(Stage("test", rows, None, token_loss), NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False),
              tokenizer, settings, Distributed(), torch.device("cpu"))
    before = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    monkeypatch.setattr(nanomind.trainer, "learning_rate", schedule)
    time.sleep(1.0)  # time between the crash and the resume is not budget spent
    train(Stage("test", rows, None, token_loss), NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False),
          tokenizer, settings, Distributed(), torch.device("cpu"))
    after = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert after[:12] == before[:12] and after[11]["step"] == 12  # the run went on from its step-12 checkpoint
    # The schedule goes on from where the checkpoint left it, not from the peak, and the budget is
    # what remained: the resumed part used about 4 s minus what the first part had spent.
    assert after[12]["lr"] <= before[11]["lr"] and after[12]["budget_used"] >= before[11]["budget_used"]
    assert after[-1]["budget_used"] >= 1 > after[-2]["budget_used"]


def test_options_come_from_a_yaml_file_and_flags_win(tmp_path):
    from nanomind.cli import build_parser, expand_config_file
    (tmp_path / "run.yaml").write_text("data: [a.jsonl, b.jsonl]\nlr: 0.01\nbatch_size: 3\nresume: true\nout: x\n")
    argv = expand_config_file(["pretrain", "--config", str(tmp_path / "run.yaml"), "--lr", "0.5"])
    args = build_parser().parse_args(argv)
    assert args.data == ["a.jsonl", "b.jsonl"] and args.batch_size == 3 and args.resume
    assert args.lr == 0.5 and str(args.out) == "x"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_both_optimizers_reduce_the_loss_and_resume_their_state(prepared, tmp_path, optimizer):
    from conftest import tiny_config
    from nanomind.model import NanoMind
    from nanomind.trainer import build_optimizer

    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    torch.manual_seed(0)
    model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False)
    if optimizer == "muon":
        # Muon takes the blocks' matrices; embeddings and norms stay with AdamW.
        opt = build_optimizer(model, 1e-3, 0.1, "muon")
        muon, adam = opt.optimizers
        assert isinstance(muon, torch.optim.Muon) and all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
        assert any(p is model.model.embed_tokens.weight for g in adam.param_groups for p in g["params"])
    settings = TrainSettings(out=tmp_path / "run", batch_size=8, max_steps=25, lr=3e-3, eval_every=0,
                             optimizer=optimizer, save_every=25)
    train(Stage("test", rows, None, token_loss), model, tokenizer, settings, Distributed(), torch.device("cpu"))
    history = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert np.mean(history[-5:]) < history[0] - 1.0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000025" / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["optimizers"]) == (2 if optimizer == "muon" else 1)


@pytest.mark.parametrize("options", [dict(adjust_lr_fn="match_rms_adamw"),
                                     dict(adjust_lr_fn="original", nesterov=False, momentum=0.9)])
def test_cpu_muon_takes_torch_muons_steps(options):
    """The fp32 Muon the CPU uses moves weights as torch.optim.Muon (bf16 Newton-Schulz) does, to bf16's
    precision: momentum, Nesterov or not, weight decay and step size over several steps, with several
    matrices of one shape (orthogonalised as one batch), tall, wide and square ones, and one without a
    gradient; its state loads into torch's optimizer."""
    from nanomind.trainer import CpuMuon

    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (48, 16), (16, 48), (32, 32), (32, 32)]
    start = [torch.randn(*shape) * (1 + i) for i, shape in enumerate(shapes)]  # different norms per matrix
    ours = [w.clone().requires_grad_() for w in start]
    theirs = [w.clone().requires_grad_() for w in start]
    frozen = torch.randn(8, 8, requires_grad=True)  # never gets a gradient
    settings = dict(lr=0.02, weight_decay=0.1, **options)
    ours_optimizer, theirs_optimizer = CpuMuon(ours + [frozen], **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours_optimizer.step()
        theirs_optimizer.step()
    for a, b, w in zip(ours, theirs, start):
        moved = (b - w).abs().max()
        assert moved > 0.01
        assert (a - b).abs().max() < 0.03 * moved
    assert frozen.grad is None and len(ours_optimizer.state) == len(ours)
    reloaded = torch.optim.Muon(theirs, **settings)
    reloaded.load_state_dict({**ours_optimizer.state_dict(), "param_groups": theirs_optimizer.state_dict()["param_groups"]})
    assert torch.equal(reloaded.state[theirs[0]]["momentum_buffer"], ours_optimizer.state[ours[0]]["momentum_buffer"])


def test_metrics_also_go_to_tensorboard_and_wandb(prepared, tmp_path, monkeypatch):
    """Behind flags, the same per-step numbers reach TensorBoard's event files and wandb's log calls."""
    import types

    from conftest import tiny_config
    from nanomind.model import NanoMind

    calls = []
    fake_wandb = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or fake_run)
    fake_run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                                     finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    settings = TrainSettings(out=tmp_path / "run", batch_size=4, max_steps=3, eval_every=0, tensorboard=True,
                             wandb="nanomind-test")
    train(Stage("test", rows, None, token_loss), NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False),
          tokenizer, settings, Distributed(), torch.device("cpu"), {"stage": "test"})
    logged = losses(tmp_path / "run")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert np.allclose([e.value for e in events.Scalars("loss")], logged, rtol=1e-6)
    assert "mfu" in events.Tags()["scalars"] and "lr" in events.Tags()["scalars"]

    assert calls[0][0] == "init" and calls[0][1]["project"] == "nanomind-test" and calls[0][1]["config"] == {"stage": "test"}
    assert [(c[1], c[2]["loss"]) for c in calls if c[0] == "log"] == list(zip([1, 2, 3], logged))
    assert calls[-1] == ("finish",)


def test_compiled_training_matches_eager_and_saves_a_plain_checkpoint(prepared, tmp_path):
    """--compile (torch.compile, inductor) trains the same function: the same losses to float noise, and
    a checkpoint with the model's own tensor names."""
    common = ["--max-steps", 3, "--eval-every", 3, "--lr", 3e-3]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = subprocess.run(nanomind(*pretrain_args(prepared, tmp_path / name, *common, *extra)),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert np.allclose(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), atol=1e-4, rtol=0)
    eager, compiled = (load_model(tmp_path / name / "model").state_dict() for name in ("eager", "compiled"))
    assert list(eager) == list(compiled)  # no torch.compile prefixes in the saved names
    # Adam turns float-noise gradients near 0 into steps of up to lr, so weights agree to that scale.
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-2) for k in eager)


def test_layer_drop_draws_depend_on_seed_and_step_only():
    from nanomind.trainer import LayerDrop

    together, alone = LayerDrop(0.25, 4, (1, 2)), LayerDrop(0.5, 4)
    draws = [together.draw(0, step) for step in range(800)]
    assert set(draws) == {frozenset(), frozenset({1, 2})} and 150 < draws.count(frozenset({1, 2})) < 250
    assert draws == [together.draw(0, step) for step in range(800)]  # a resumed run draws the same
    assert draws != [together.draw(1, step) for step in range(800)]
    patterns = Counter(alone.draw(0, step) for step in range(1600))  # each of the 16 subsets, 1 step in 16
    assert len(patterns) == 16 and all(60 < n < 140 for n in patterns.values())


@pytest.mark.parametrize("settings, message", [
    (dict(layer_drop=1.0), "a probability"),
    (dict(layer_drop_layers=[1]), "needs --layer-drop P"),
    (dict(layer_drop=0.2, layer_drop_layers=[2]), "the model has layers 0..1"),
    (dict(layer_drop=0.2, layer_drop_layers=[0, 1]), "keep at least one"),
    (dict(layer_drop=0.2, compile=True), "leave out --compile"),
])
def test_bad_layer_drop_settings_stop_before_training(prepared, tmp_path, settings, message):
    from conftest import tiny_config
    from nanomind.model import NanoMind

    tokenizer = Tokenizer.load(prepared / "tok")
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    rows = open_rows(prepared / "data", "train", manifest, tokenizer.pad_id)
    model = NanoMind(tiny_config(vocab_size=tokenizer.vocab_size), verbose=False)
    with pytest.raises(TrainingError, match=message):
        train(Stage("pretrain", rows, None, token_loss), model, tokenizer,
              TrainSettings(out=tmp_path / "run", max_steps=1, **settings), Distributed(), torch.device("cpu"))
    with pytest.raises(TrainingError, match="dpo compares the model"):
        train(Stage("dpo", rows, None, token_loss), model, tokenizer,
              TrainSettings(out=tmp_path / "run", max_steps=1, layer_drop=0.2), Distributed(), torch.device("cpu"))
