"""The one training loop every stage shares.

A stage (pretrain.py, sft.py, and later LoRA, DPO, distillation) supplies a `Stage`: how to build
its batches and how to compute its loss. Everything else lives here once: devices and torchrun/DDP,
precision, gradient accumulation with `no_sync`, the learning-rate schedule, clipping, validation,
samples, metrics, atomic checkpoints and exact resume, and the NaN guard.

Run layout (`--out DIR`):
  DIR/checkpoints/step-000100/   a normal nanomind checkpoint + trainer_state.pt (resume state, fp32)
  DIR/model/                     the final checkpoint
  DIR/metrics.jsonl              one line per step (and per evaluation)
  DIR/config.json                the resolved run configuration
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_model, save_checkpoint
from .model import NanoMind


class TrainingError(ValueError):
    """A problem the user can act on (bad options, too little data, a diverged run): no traceback."""


# ----------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values


def setup_distributed(device: str) -> tuple[Distributed, torch.device]:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed(), torch.device(device)
    run = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda"):
        torch.cuda.set_device(run.local_rank)
        device = f"cuda:{run.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return run, torch.device(device)


# ----------------------------------------------------------------------------------------------
# Batches: a deterministic, resumable order of rows, sharded over ranks


class RowSampler:
    """Epoch after epoch, a seeded permutation of the rows, cut into global micro-batches of
    `batch_size * world_size` rows; rank r takes its slice. The position is two integers, so a
    resumed run continues with exactly the rows the killed run would have seen."""

    def __init__(self, num_rows: int, batch_size: int, run: Distributed, seed: int, shuffle: bool = True):
        self.global_batch = batch_size * run.world_size
        if num_rows < self.global_batch:
            raise TrainingError(f"only {num_rows} training rows: fewer than one batch of {self.global_batch} "
                                "(batch size x processes); use more data or a smaller --batch-size")
        self.num_rows, self.batch_size, self.run, self.seed, self.shuffle = num_rows, batch_size, run, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.num_rows, generator=g)
            else:
                self._order = torch.arange(self.num_rows)
        return self._order

    def next_rows(self) -> torch.Tensor:
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        start = self.cursor * self.global_batch + self.run.rank * self.batch_size
        self.cursor += 1
        return self._epoch_order()[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None


class RowBatches:
    """The usual batch source: micro-batches of prepared rows in RowSampler's order. A stage may
    bring another source with the same methods (RL generates its batches from the model)."""

    def __init__(self, rows, sampler: RowSampler):
        self.rows, self.sampler = rows, sampler

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batches(self, n: int) -> list[dict]:
        return [self.rows.rows(self.sampler.next_rows()) for _ in range(n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# What a stage provides


def trained_tokens(batch: dict) -> torch.Tensor:
    return (batch["targets"] != -100).sum()


def save_full_model(model, folder: Path, tokenizer, weights: dict, write_extra=None) -> None:
    save_checkpoint(model, folder, tokenizer=tokenizer, dtype=torch.float32, write_extra=write_extra,
                    state_dict=weights)


def load_full_weights(model, folder: Path) -> dict:
    return load_model(folder, dtype=torch.float32).state_dict()


@dataclass
class Stage:
    """One training stage: its data and its loss, on top of the shared loop."""

    name: str
    train_rows: object  # has __len__ and rows(indices) -> dict of (B, ...) tensors
    val_rows: object | None
    # loss_fn(model, batch) -> (sum of the per-unit losses, number of units, metrics dict)
    loss_fn: object
    # count_fn(batch) -> number of units the loss averages over: trained tokens, DPO pairs, ...
    # Known before the forward, so a step normalises by the whole global batch.
    count_fn: object = trained_tokens
    sample_prompts: list[str] = field(default_factory=list)
    chat_samples: bool = False
    # What the stage writes (the full model, or only a LoRA adapter), and how a resume reads it back:
    # save_fn(model, folder, tokenizer, weights, write_extra) writes atomically; load_fn(model, folder)
    # returns the state dict to load (every trained tensor).
    save_fn: object = save_full_model
    load_fn: object = load_full_weights
    output_name: str = "model"  # the final result goes to OUT/output_name
    # Where each step's micro-batches come from (None: RowBatches over train_rows). See RowBatches.
    batch_source: object = None


def token_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Next-token cross-entropy summed over the trained tokens (+ the MoE balance loss)."""
    out = model(batch["inputs"], targets=batch["targets"])
    n_tokens = trained_tokens(batch)
    loss_sum = out.loss * n_tokens
    metrics = {}
    if out.aux_loss is not None:
        loss_sum = loss_sum + unwrap(model).config.router_aux_loss_coef * out.aux_loss * n_tokens
        metrics["aux_loss"] = out.aux_loss.detach()
    return loss_sum, n_tokens, metrics


def unwrap(model):
    """The NanoMind inside a DDP (and/or torch.compile) wrapper."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


class CombinedOptimizer:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


class CpuMuon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iterations in fp32 instead of bf16, for the CPU.

    Most CPUs have no bf16 matrix units and emulate them: on one AVX2 core torch's Muon made the demo
    model's training steps 5x slower than AdamW's (benchmarks/bench_optimizer.py). Here the matrices of
    one shape (every layer's query projection, every layer's up projection, ...) are also orthogonalised
    together, as one batch of small matrix products instead of many. Same options, same state (a
    momentum buffer per matrix) and the same update as torch's, to bf16's precision.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[tuple, list] = {}  # shape -> [(parameter, momentum update)]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for (rows, cols), pairs in by_shape.items():
                directions = orthogonalise(torch.stack([update for _, update in pairs]), group["ns_coefficients"],
                                           group["ns_steps"], group["eps"])
                # The step's size, as torch scales it: matched to AdamW's update size ("match_rms_adamw"),
                # or Keller Jordan's original sqrt(rows / cols) for tall matrices.
                scale = 0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" else \
                    math.sqrt(max(1, rows / cols))
                for (p, _), direction in zip(pairs, directions):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(direction, alpha=-lr * scale)
        return loss


def orthogonalise(matrices: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """For each matrix M = U S V^T of a batch (batch, rows, cols), an approximation of U V^T (its singular
    values pushed towards 1) by torch.optim.Muon's quintic Newton-Schulz iteration, in fp32; the Gram
    matrix is taken on the smaller side."""
    a, b, c = coefficients
    tall = matrices.size(-2) > matrices.size(-1)
    x = matrices.float().mT if tall else matrices.float()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # singular values <= 1: the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(matrices.dtype)


def _plain_parameters(params, device_types: tuple[str, ...]) -> bool:
    """Whether every parameter is an ordinary tensor (not sharded by FSDP) on one of these devices."""
    return all(type(p) is torch.nn.Parameter and p.device.type in device_types for p in params)


def build_optimizer(model: NanoMind, lr: float, weight_decay: float, kind: str = "adamw",
                    betas=(0.9, 0.95)) -> CombinedOptimizer:
    """AdamW where matrices decay and norms and embeddings do not (decaying them only hurts); with
    kind="muon", the blocks' weight matrices use Muon (orthogonalised momentum) instead, its update
    scaled to AdamW's size so the same --lr serves both."""
    embedding = model.model.embed_tokens.weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trainable if p.dim() >= 2 and p is not embedding and p is not model.lm_head.weight]
    others = [p for p in trainable if not any(p is m for m in matrices)]
    optimizers = []
    if kind == "muon":
        muon = CpuMuon if _plain_parameters(matrices, ("cpu",)) else torch.optim.Muon  # GPU, FSDP: torch's own
        optimizers.append(muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        adam_groups = [{"params": others, "weight_decay": 0.0}]
    elif kind == "adamw":
        decay = [p for p in others if p.dim() >= 2 and p is not embedding] + matrices
        no_decay = [p for p in others if not (p.dim() >= 2 and p is not embedding)]
        adam_groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        # The fused kernel is ~3x faster than the default on CPU and GPU; sharded (DTensor) parameters
        # take the default implementation.
        plain = _plain_parameters([p for g in adam_groups for p in g["params"]], ("cpu", "cuda"))
        optimizers.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, fused=plain or None))
    return CombinedOptimizer(optimizers)


def learning_rate(step: int, total_steps: int, peak: float, warmup: int, schedule: str,
                  min_ratio: float, decay_fraction: float = 0.2, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine to min_ratio*peak, or warm-up-stable-decay (flat, then a linear
    decay over the last `decay_fraction` of the run). The run's progress is its share of the steps, or
    of its time budget (`time_fraction`) when that is further on, so a time-boxed run ends annealed."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = max((step - warmup) / max(total_steps - warmup, 1), time_fraction)
    if schedule == "cosine":
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    if schedule == "wsd":
        decay_start = 1 - decay_fraction
        if progress < decay_start:
            return peak
        return peak * (1 - (1 - min_ratio) * min((progress - decay_start) / decay_fraction, 1.0))
    raise ValueError(f"unknown schedule {schedule!r}")


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainSettings:
    out: Path
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.1
    optimizer: str = "adamw"
    layer_drop: float = 0.0  # the chance that a step skips layers (LayerDrop)
    layer_drop_layers: list[int] | None = None  # the layers it skips together; None: each on its own
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    time_budget: float | None = None  # seconds
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    resume: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    tensorboard: bool = False  # also log to OUT/tensorboard
    wandb: str | None = None  # also log to this wandb project


def train(stage: Stage, model: NanoMind, tokenizer, settings: TrainSettings, run: Distributed,
          device: torch.device, config_record: dict | None = None) -> dict:
    """Train `model` on `stage`; returns the final metrics. Only rank 0 writes files."""
    s = settings
    out = Path(s.out)
    torch.manual_seed(s.seed)
    model.to(device)
    layer_drop = _layer_drop(s, stage, model.config.num_hidden_layers)
    if s.fsdp:
        _shard(model, run, s)
    source = stage.batch_source or RowBatches(stage.train_rows,
                                              RowSampler(len(stage.train_rows), s.batch_size, run, s.seed))
    total_steps = _total_steps(s, source)
    optimizer = build_optimizer(model, s.lr, s.weight_decay, s.optimizer)
    start_step, history = 0, []

    checkpoint_dir = out / "checkpoints"
    if s.resume:
        if run.is_main:
            remove_unfinished_checkpoints(checkpoint_dir)
        latest = latest_checkpoint(checkpoint_dir)
        if latest is None:
            if run.is_main:
                print(f"--resume: no checkpoint in {checkpoint_dir}, starting from scratch")
        else:
            start_step, history = _restore(latest, stage, model, optimizer, source, run, s.fsdp)
            if run.is_main:
                print(f"resumed from {latest} at step {start_step}")
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if config_record is not None:
            (out / "config.json").write_text(json.dumps(config_record, indent=2, default=str) + "\n")
        _rewrite_metrics(out / "metrics.jsonl", history)

    train_model = model
    if run.enabled and not s.fsdp:
        # A step that skips layers leaves their parameters without gradients, which DDP must be told of.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=layer_drop is not None)
    if s.compile:
        train_model = torch.compile(train_model)
    autocast = autocast_context(device, s.precision)
    flops_per_token = 6 * model.num_parameters(active_only=True)
    peak_flops = peak_flops_per_process(device)
    progress = ProgressPrinter(total_steps, enabled=run.is_main, time_budget=s.time_budget)
    sinks = MetricSinks(out, s.tensorboard, s.wandb, config_record) if run.is_main else None
    # The share of --time-budget spent, the same on every rank; a resumed run continues the clock (and
    # so the schedule) where the checkpoint left it.
    time_used = history[-1].get("budget_used", 0.0) if history else 0.0
    resumed = time.perf_counter()
    started = resumed - time_used * (s.time_budget or 0)
    metrics = {}

    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        lr = learning_rate(step, total_steps, s.lr, s.warmup_steps, s.schedule, s.min_lr_ratio, time_fraction=time_used)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [_to_device(b, device) for b in source.next_batches(s.grad_accum)]
        # Normalise by the loss units (trained tokens, pairs...) of the whole global step, so every unit
        # weighs the same whatever rank or micro-batch it landed in (DDP then averages gradients over
        # ranks). Throughput counts every token the model reads.
        local = torch.stack([sum(stage.count_fn(b) for b in batches).float().to(device),
                             torch.tensor(float(sum(b["inputs"].numel() for b in batches if "inputs" in b)),
                                          device=device)])
        global_units, global_tokens = run.all_reduce_sum(local).unbind()
        global_units = global_units.clamp(min=1)
        loss_total = torch.zeros((), device=device)
        extra: dict[str, torch.Tensor] = {}
        if layer_drop is not None:
            model.skipped_layers = layer_drop.draw(s.seed, step)
            extra["layers_skipped"] = torch.tensor(float(len(model.skipped_layers)), device=device)
        train_model.train()
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not run.enabled
            with _gradient_sync(train_model, sync, s.fsdp), autocast:
                loss_sum, _, step_metrics = stage.loss_fn(train_model, batch)
                (loss_sum * run.world_size / global_units).backward()
            loss_total += loss_sum.detach().float()
            for k, v in step_metrics.items():
                extra[k] = extra.get(k, 0) + v.float() / len(batches)
        loss = (run.all_reduce_sum(loss_total) / global_units).item()
        if not math.isfinite(loss):
            last = latest_checkpoint(checkpoint_dir)
            raise TrainingError(f"the loss became {loss} at step {step + 1}; stopping without saving. "
                                f"Last good checkpoint: {last or 'none'}. Try a lower --lr or check the data.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - step_start
        tokens = int(global_tokens.item())
        metrics = {"step": step + 1, "loss": loss, "lr": lr, "tokens": tokens,
                   "tokens_per_s": tokens / elapsed, "epoch": source.epoch,
                   **{k: (run.all_reduce_sum(v.clone()) / run.world_size).item() for k, v in extra.items()}}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["mfu"] = flops_per_token * tokens / elapsed / (run.world_size * peak_flops)
        time_used = _time_used(s, started, run, device)
        if s.time_budget is not None:
            metrics["budget_used"] = time_used
        last_step = step + 1 == total_steps or time_used >= 1
        if stage.val_rows is not None and s.eval_every and ((step + 1) % s.eval_every == 0 or last_step):
            metrics.update(evaluate(model, stage, s, run, device, autocast))
        # Sampling runs on rank 0 alone, which a sharded model cannot do (every forward gathers shards).
        if run.is_main and s.sample_every and not s.fsdp and ((step + 1) % s.sample_every == 0 or last_step):
            metrics["samples"] = _samples(model, tokenizer, stage)
        history.append(metrics)
        if run.is_main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics, ensure_ascii=False) + "\n")
            progress.update(metrics, step + 1 - start_step, time.perf_counter() - resumed)
            sinks.log(metrics)
        if (s.save_every and (step + 1) % s.save_every == 0) or last_step:
            _save_training_checkpoint(stage, checkpoint_dir, step + 1, model, tokenizer, optimizer, source, history,
                                      run, s.keep_last, config_record, s.fsdp)
        if last_step:
            break
    model.skipped_layers = frozenset()  # what train() hands back runs every layer
    progress.close()
    if sinks is not None:
        sinks.close()
    weights, _ = _full_state(model, None, s.fsdp)
    if run.is_main:
        stage.save_fn(model, out / stage.output_name, tokenizer, weights)
        print(f"saved {out / stage.output_name}")
    run.barrier()
    return metrics


@dataclass
class LayerDrop:
    """Training steps that skip decoder layers (LayerDrop, Fan et al. 2019), so that the model keeps
    working with those layers removed (`nanomind convert --keep-layers`): each optimizer step skips,
    with chance `probability`, `layers` together, or with no `layers` each layer on its own.

    A step's draw depends on the seed and the step alone: every DDP rank skips the same layers, and a
    resumed run skips what the uninterrupted one would have."""

    probability: float
    num_layers: int
    layers: tuple[int, ...] | None = None

    def draw(self, seed: int, step: int) -> frozenset[int]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        chances = torch.rand(self.num_layers if self.layers is None else 1, generator=generator).tolist()
        if self.layers is None:
            return frozenset(i for i, chance in enumerate(chances) if chance < self.probability)
        return frozenset(self.layers) if chances[0] < self.probability else frozenset()


# Stages whose loss compares the trained model with itself or a reference run with every layer (DPO's
# margins, RL's probability ratios): skipped layers there would bias the comparison.
LAYER_DROP_STAGES = ("pretrain", "sft", "distill", "lora")


def _layer_drop(s: TrainSettings, stage: Stage, num_layers: int) -> LayerDrop | None:
    if not s.layer_drop:
        if s.layer_drop_layers:
            raise TrainingError("--layer-drop-layers needs --layer-drop P, the chance that a step drops them")
        return None
    if not 0 < s.layer_drop < 1:
        raise TrainingError(f"--layer-drop {s.layer_drop}: a probability, above 0 and below 1")
    if stage.name not in LAYER_DROP_STAGES:
        raise TrainingError(f"--layer-drop is for {', '.join(LAYER_DROP_STAGES)}: {stage.name} compares the model "
                            "with a run that has every layer; train without it")
    if s.fsdp or s.compile:
        raise TrainingError("--layer-drop works with plain and DDP training only: leave out "
                            f"{'--fsdp' if s.fsdp else '--compile'} (each skip pattern would be a new graph "
                            "to compile, or to shard)")
    layers = s.layer_drop_layers
    if layers is not None:
        if bad := [i for i in layers if not 0 <= i < num_layers]:
            raise TrainingError(f"--layer-drop-layers {','.join(map(str, bad))}: the model has layers "
                                f"0..{num_layers - 1}")
        if len(set(layers)) >= num_layers:
            raise TrainingError("--layer-drop-layers names every layer; keep at least one")
        layers = tuple(sorted(set(layers)))
    return LayerDrop(s.layer_drop, num_layers, layers)


def _shard(model: NanoMind, run: Distributed, s: TrainSettings) -> None:
    """FSDP2: each block's parameters (and their gradients and optimizer state) live split over the
    processes and are gathered only while that block computes."""
    from torch.distributed.fsdp import fully_shard

    if not run.enabled:
        raise TrainingError("--fsdp shards over processes: launch with torchrun --nproc_per_node N")
    if s.optimizer != "adamw":
        raise TrainingError("--fsdp works with --optimizer adamw only")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def _gradient_sync(train_model, sync: bool, fsdp: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of accumulation."""
    if fsdp:
        train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()


def _full_state(model, optimizer, fsdp: bool) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state. With FSDP every rank must call this (it gathers)."""
    if not fsdp:
        return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = (get_optimizer_state_dict(model, optimizer.optimizers, options=options)
                       if optimizer is not None else None)
    return weights, optimizer_state


def _total_steps(s: TrainSettings, source) -> int:
    if s.max_steps:
        return s.max_steps
    epochs = s.epochs if s.epochs else (None if s.time_budget else 1)
    if epochs is None:
        return 10**12  # until the time budget runs out
    return max(1, int(epochs * source.batches_per_epoch / s.grad_accum))


def _time_used(s: TrainSettings, started: float, run: Distributed, device) -> float:
    """The share of the time budget spent (0 without one), as the slowest rank sees it: ranks decide
    together when to stop, or one would wait for the others forever, and schedule the same rate."""
    if s.time_budget is None:
        return 0.0
    spent = torch.tensor((time.perf_counter() - started) / s.time_budget, dtype=torch.float32, device=device)
    return run.all_reduce_max(spent).item()


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops_per_process(device: torch.device) -> float:
    """The FLOP/s that MFU is measured against: the dense bf16 peak of common GPUs (H100/H200 SXM:
    989 TFLOPS); on a CPU, the fp32 matmul rate measured here and now (best of a few 1024^3 products),
    so the figure reads as "share of what this machine's matmuls can do"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("4090", 165e12),
                           ("3090", 71e12), ("L4", 121e12), ("A10", 125e12), ("T4", 65e12)):
            if key in name:
                return flops
        return 100e12
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


class MetricSinks:
    """Where the step metrics go besides OUT/metrics.jsonl: TensorBoard (OUT/tensorboard) and wandb,
    each only when asked for, and neither a required dependency."""

    def __init__(self, out: Path, tensorboard: bool, wandb_project: str | None, config: dict | None):
        self.writer = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainingError(f"--tensorboard needs the tensorboard package: pip install tensorboard ({e})")
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrainingError("--wandb needs the wandb package: pip install wandb "
                                    "(WANDB_MODE=offline logs without an account)")
            self.wandb = wandb.init(project=wandb_project, name=out.name, dir=str(out),
                                    config=json.loads(json.dumps(config or {}, default=str)))

    def log(self, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, metrics["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, stage: Stage, s: TrainSettings, run: Distributed, device, autocast) -> dict:
    """`val_loss` (mean loss per unit) and the stage's metrics (`val_*`, mean per batch) over the first
    `eval_batches` validation batches, on all ranks."""
    model.eval()
    n = len(stage.val_rows)
    total, units = torch.zeros((), device=device), torch.zeros((), device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    batches = torch.zeros((), device=device)
    order = torch.arange(n)
    per_batch = s.batch_size * run.world_size
    with torch.no_grad():
        for b in range(min(s.eval_batches, math.ceil(n / per_batch))):
            rows = order[b * per_batch + run.rank * s.batch_size: b * per_batch + (run.rank + 1) * s.batch_size]
            if len(rows) == 0:
                continue
            with autocast:
                loss_sum, n_units, batch_metrics = stage.loss_fn(model, _to_device(stage.val_rows.rows(rows), device))
            total += loss_sum.float()
            units += n_units
            batches += 1
            for k, v in batch_metrics.items():
                metric_sums[k] = metric_sums.get(k, torch.zeros((), device=device)) + v.float()
    model.train()
    batches = run.all_reduce_sum(batches).clamp(min=1)
    # Every rank must reduce the same keys in the same order: a rank without a batch has none.
    keys = sorted(metric_sums)
    return {"val_loss": (run.all_reduce_sum(total) / run.all_reduce_sum(units).clamp(min=1)).item(),
            **{f"val_{k}": (run.all_reduce_sum(metric_sums[k]) / batches).item() for k in keys}}


def _samples(model, tokenizer, stage: Stage) -> list[str]:
    from .generation import SamplingParams, generate
    prompts = stage.sample_prompts
    if stage.chat_samples:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    model.eval()
    params = SamplingParams(max_new_tokens=24, eos_ids=[tokenizer.eos_id, tokenizer.pad_id])
    completions = generate(model, tokenizer, prompts, params)
    model.train()
    return [f"{p!r} -> {c.text!r}" for p, c in zip(stage.sample_prompts, completions)]


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume

STEP_DIR = re.compile(r"^step-(\d+)$")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones are hidden temp folders, never named step-N)."""
    if not checkpoint_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def remove_unfinished_checkpoints(checkpoint_dir: Path) -> None:
    """Delete what a run killed inside a checkpoint write left behind: the hidden `.step-N.tmp-*`
    folder it was writing (or a `.step-N.old-*` one it was replacing). Never read, but each is a
    whole checkpoint's size."""
    if checkpoint_dir.is_dir():
        for leftover in checkpoint_dir.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_training_checkpoint(stage: Stage, checkpoint_dir: Path, step: int, model, tokenizer, optimizer, source,
                              history, run: Distributed, keep_last: int, config_record, fsdp: bool) -> None:
    weights, optimizer_state = _full_state(model, optimizer, fsdp)
    rng_states = [None] * run.world_size
    if run.enabled:
        dist.all_gather_object(rng_states, _rng_state())
    else:
        rng_states = [_rng_state()]
    if run.is_main:
        state = {"step": step, "optimizer": optimizer_state, "sampler": source.state_dict(), "fsdp": fsdp,
                 "rng": rng_states, "history": history, "config": config_record, "world_size": run.world_size}

        def write_state(folder: Path) -> None:
            torch.save(state, folder / "trainer_state.pt")

        stage.save_fn(model, checkpoint_dir / f"step-{step:06d}", tokenizer, weights, write_state)
        steps = sorted((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_DIR.match(p.name)))
        for _, old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    run.barrier()


def _restore(folder: Path, stage: Stage, model, optimizer, source, run: Distributed,
             fsdp: bool) -> tuple[int, list]:
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state["world_size"] != run.world_size or state.get("fsdp", False) != fsdp:
        raise TrainingError(f"{folder} was written by {state['world_size']} process(es)"
                            f"{' with --fsdp' if state.get('fsdp') else ''}; resume it the same way (now "
                            f"{run.world_size}{' with --fsdp' if fsdp else ''}), so the data order stays the same")
    weights = stage.load_fn(model, folder)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer.optimizers, state["optimizer"], options=options)
    else:
        if stage.load_fn is load_full_weights:
            model.load_state_dict(weights)
        else:  # a partial state (an adapter): it must hold every trained tensor, and nothing unknown
            missing = {n for n, p in model.named_parameters() if p.requires_grad} - weights.keys()
            unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
            if missing or unexpected:
                raise TrainingError(f"{folder}: does not match the model being trained (missing "
                                    f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        optimizer.load_state_dict(state["optimizer"])
    source.load_state_dict(state["sampler"])
    rng = state["rng"][run.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["history"]


def _rewrite_metrics(path: Path, history: list) -> None:
    """On resume, drop lines a killed run logged after its last checkpoint."""
    with open(path, "w", encoding="utf-8") as f:
        for metrics in history:
            f.write(json.dumps(metrics, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# What the user sees


class ProgressPrinter:
    """One status line per `interval` seconds: step, loss, lr, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, enabled: bool, time_budget: float | None = None, interval: float = 2.0):
        self.total, self.enabled, self.interval, self.last = total_steps, enabled, interval, -1e9
        self.time_budget = time_budget
        self.tty = sys.stdout.isatty()

    def update(self, m: dict, steps_done: int, elapsed: float) -> None:
        if not self.enabled:
            return
        evaluated = "val_loss" in m
        if not evaluated and time.perf_counter() - self.last < self.interval and m["step"] != self.total:
            return
        self.last = time.perf_counter()
        remaining = [elapsed / steps_done * (self.total - m["step"])] if self.total < 10**12 else []
        if self.time_budget is not None:
            remaining.append(max(self.time_budget * (1 - m.get("budget_used", 0.0)), 0))
        eta = f" | eta {_duration(min(remaining))}" if remaining else ""
        line = (f"step {m['step']}/{self.total if self.total < 10**12 else '?'} | loss {m['loss']:.4f} | "
                f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s"
                + (f" | mfu {m['mfu']:.1%}" if "mfu" in m else "") + eta)
        if evaluated:
            line += f" | val_loss {m['val_loss']:.4f}"
        print(("\r" + line.ljust(100)) if self.tty and not evaluated else line, end="" if self.tty and not evaluated
              else "\n", flush=True)
        for sample in m.get("samples", []):
            print(f"  sample: {sample}")

    def close(self) -> None:
        if self.enabled and self.tty:
            print()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# From command-line options to a running stage (shared by every stage command)


@dataclass
class StageInputs:
    """What `run_stage` has set up for a stage to build on."""

    args: object  # the parsed command line
    train_rows: object
    val_rows: object | None
    model: NanoMind  # the model to train (a stage may add adapters to it)
    tokenizer: object
    run: Distributed
    device: torch.device
    data_dir: Path  # the prepared data folder


def run_stage(args, kind: str, make_stage) -> dict:
    """Set up devices, tokenizer, data (preparing raw JSONL on the fly), model and settings from the
    shared options, build the stage with `make_stage(StageInputs)`, and train it."""
    from .model import preset_config
    from .prepare import PrepareOptions, load_manifest, open_rows, prepare
    from .tokenizer import Tokenizer

    run, device = setup_distributed(args.device)
    source = args.init_from or args.tokenizer
    if source is None:
        raise TrainingError("pass --init-from CHECKPOINT (a model with its tokenizer) or --tokenizer DIR")
    tokenizer = Tokenizer.load(args.tokenizer or args.init_from)
    out = Path(args.out)

    data_dir = Path(args.data[0])
    if not (len(args.data) == 1 and data_dir.is_dir()):
        # Raw JSONL: prepare into a cache inside the run folder (a no-op when it is already there).
        data_dir = out / "prepared"
        if run.is_main:
            prepare(args.data, args.tokenizer or args.init_from, data_dir,
                    PrepareOptions(kind=kind, seq_len=args.seq_len, val_fraction=args.val_fraction,
                                   seed=args.seed, skip_bad=args.skip_bad), workers=args.workers)
        run.barrier()
    manifest = load_manifest(data_dir, tokenizer, kind)
    train_rows = open_rows(data_dir, "train", manifest, tokenizer.pad_id)
    val_rows = open_rows(data_dir, "val", manifest, tokenizer.pad_id)
    if train_rows is None:
        raise TrainingError(f"{data_dir}: no training rows")

    if args.init_from:
        model = load_model(args.init_from, dtype=torch.float32)
    else:
        from .cli import model_overrides
        config = preset_config(args.preset, **{**model_overrides(args), "vocab_size": tokenizer.vocab_size})
        torch.manual_seed(args.seed)
        model = NanoMind(config, verbose=run.is_main)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise TrainingError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                            f"tokenizer's ({tokenizer.vocab_size})")
    settings = TrainSettings(**{f: getattr(args, f) for f in TrainSettings.__dataclass_fields__ if hasattr(args, f)})
    record = {"stage": kind, "data": str(data_dir), **{k: v for k, v in vars(args).items() if k != "func"}}
    try:
        torch.manual_seed(args.seed)  # what a stage initialises (adapters, heads) is the same on every run
        stage = make_stage(StageInputs(args, train_rows, val_rows, model, tokenizer, run, device, data_dir))
        return train(stage, model, tokenizer, settings, run, device, record)
    finally:
        if run.enabled:
            dist.destroy_process_group()
