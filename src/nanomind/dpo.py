"""Direct preference optimisation: teach a model to prefer the `chosen` answer of each pair over the
`rejected` one, measured against a frozen reference (the starting model).

  nanomind dpo --data dpo.jsonl --init-from runs/sft/model --out runs/dpo --precompute-ref

A sequence's log-probability is summed over its assistant tokens; a pair's chosen and rejected rows
go through the model in one forward. With `margin = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)`:
  sigmoid  -(1 - ls) * logsigmoid(beta * margin) - ls * logsigmoid(-beta * margin)   (DPO; ls = label smoothing)
  ipo      (margin - 1 / (2 beta))^2
  hinge    relu(1 - beta * margin)
plus, with --rpo-alpha, alpha times the chosen answer's mean next-token NLL. The reference is either a
frozen copy of the model, scored every step, or (--precompute-ref) scored once before training and cached
in OUT/reference_logps.pt, which halves the memory and compute of a step.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import NanoMind
from .prepare import load_manifest
from .sft import SAMPLE_PROMPTS
from .trainer import Stage, StageInputs, TrainingError, autocast_context, run_stage, unwrap

CACHE_VERSION = 1


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits and (B, T) targets -> per row, the log-probability of its targets summed over
    the positions that are not -100 (in fp32), and how many there are."""
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="none").view(targets.shape)  # 0 where ignored
    return token_logps.sum(-1), (targets != -100).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of each pair (B,) from the four (B,) sequence log-probabilities."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    raise ValueError(f"unknown DPO loss {loss_type!r}; choose sigmoid, ipo or hinge")


@dataclass
class PreferenceLoss:
    """The stage's loss_fn: DPO (+ RPO, + the MoE balance loss) summed over the pairs of a batch."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference: NanoMind | None = None  # live reference; None when batches carry precomputed log-probs

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(batch["inputs"])
        logps, counts = sequence_logps(out.logits, batch["targets"])
        policy_chosen, policy_rejected = logps.chunk(2)
        if self.reference is None:
            reference_chosen, reference_rejected = batch["reference_logps"].unbind(-1)
        else:
            with torch.no_grad():
                reference = sequence_logps(self.reference(batch["inputs"]).logits, batch["targets"])[0]
            reference_chosen, reference_rejected = reference.chunk(2)
        losses = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta,
                          self.loss_type, self.label_smoothing)
        if self.rpo_alpha:
            chosen_tokens = counts[:len(policy_chosen)].clamp(min=1)
            losses = losses + self.rpo_alpha * -policy_chosen / chosen_tokens
        pairs = torch.tensor(len(losses), device=losses.device)
        loss_sum = losses.sum()
        chosen_reward = self.beta * (policy_chosen - reference_chosen).detach()
        rejected_reward = self.beta * (policy_rejected - reference_rejected).detach()
        metrics = {"reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
                   "reward_margin": (chosen_reward - rejected_reward).mean(),
                   "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
                   "chosen_logp": policy_chosen.detach().mean(), "rejected_logp": policy_rejected.detach().mean()}
        if out.aux_loss is not None:
            loss_sum = loss_sum + unwrap(model).config.router_aux_loss_coef * out.aux_loss * pairs
            metrics["aux_loss"] = out.aux_loss.detach()
        return loss_sum, pairs, metrics


def count_pairs(batch: dict) -> torch.Tensor:
    return torch.tensor(batch["inputs"].shape[0] // 2, device=batch["inputs"].device)


# ----------------------------------------------------------------------------------------------
# The precomputed reference


class WithReferenceLogps:
    """Rows whose batches also carry the reference's (chosen, rejected) log-probabilities, (B, 2)."""

    def __init__(self, rows, reference_logps: torch.Tensor):
        self.inner, self.reference_logps = rows, reference_logps

    def __len__(self) -> int:
        return len(self.inner)

    def rows(self, indices) -> dict:
        return {**self.inner.rows(indices), "reference_logps": self.reference_logps[torch.as_tensor(indices)]}


@torch.no_grad()
def score_pairs(model: NanoMind, rows, indices: torch.Tensor, batch_size: int, device, autocast) -> torch.Tensor:
    """(len(indices), 2) summed log-probabilities of the chosen and rejected sequences of these pairs."""
    model.eval()
    scores = []
    for start in range(0, len(indices), batch_size):
        batch = {k: v.to(device) for k, v in rows.rows(indices[start:start + batch_size]).items()}
        with autocast:
            logps = sequence_logps(model(batch["inputs"]).logits, batch["targets"])[0]
        scores.append(torch.stack(logps.float().chunk(2), dim=-1))
    model.train()
    return torch.cat(scores) if scores else torch.zeros(0, 2, device=device)


def reference_key(model: NanoMind, data_key: str, precision: str) -> str:
    """Changes when the reference weights, the prepared data or the precision change."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{data_key}:{precision}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def precomputed_reference(inputs: StageInputs, path: Path, key: str, autocast) -> dict[str, torch.Tensor]:
    """{split: (pairs, 2) reference log-probabilities}, read from `path` when it was made for `key`,
    else computed (each process scores every world_size-th pair) and written there atomically."""
    run, splits = inputs.run, {"train": inputs.train_rows, "val": inputs.val_rows}
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached["logps"]
    started, logps = time.perf_counter(), {}
    for split, rows in splits.items():
        if rows is None:
            continue
        mine = torch.arange(run.rank, len(rows), run.world_size)
        values = torch.zeros(len(rows), 2, device=inputs.device)
        values[mine.to(inputs.device)] = score_pairs(inputs.model, rows, mine, inputs.args.batch_size,
                                                     inputs.device, autocast)
        logps[split] = run.all_reduce_sum(values).cpu()  # every process fills in only its own pairs
    if run.is_main:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "logps": logps}, tmp)
        os.replace(tmp, path)
        print(f"dpo: scored the reference on {sum(map(len, logps.values()))} pairs in "
              f"{time.perf_counter() - started:.1f}s -> {path}")
    run.barrier()
    return logps


# ----------------------------------------------------------------------------------------------
# The stage


def make_stage(inputs: StageInputs) -> Stage:
    args, model, run = inputs.args, inputs.model, inputs.run
    model.to(inputs.device)
    loss_fn = PreferenceLoss(args.beta, args.loss, args.label_smoothing, args.rpo_alpha)
    train_rows, val_rows = inputs.train_rows, inputs.val_rows
    if args.precompute_ref:
        autocast = autocast_context(inputs.device, args.precision)
        precision = "bf16" if isinstance(autocast, torch.autocast) else "fp32"
        key = reference_key(model, load_manifest(inputs.data_dir)["key"], f"{precision}/{inputs.device.type}")
        path = Path(args.out) / "reference_logps.pt"
        logps = precomputed_reference(inputs, path, key, autocast)
        train_rows = WithReferenceLogps(train_rows, logps["train"])
        val_rows = WithReferenceLogps(val_rows, logps["val"]) if val_rows is not None else None
        mode = f"precomputed ({path})"
    else:
        loss_fn.reference = copy.deepcopy(model).eval().requires_grad_(False)
        mode = "live (a frozen copy of the model)"
    if run.is_main:
        print(f"dpo: {len(train_rows)} training pairs, {len(val_rows) if val_rows else 0} validation pairs | "
              f"loss {args.loss}, beta {args.beta}" + (f", rpo_alpha {args.rpo_alpha}" if args.rpo_alpha else "")
              + f" | reference: {mode}")
    return Stage("dpo", train_rows, val_rows, loss_fn, count_fn=count_pairs, sample_prompts=SAMPLE_PROMPTS,
                 chat_samples=True)


def main(args) -> dict:
    if args.init_from is None:
        raise TrainingError("dpo needs --init-from CHECKPOINT: the model to tune, which is also the frozen "
                            "reference (usually the SFT model, e.g. runs/sft/model)")
    if args.beta <= 0:
        raise TrainingError(f"--beta must be positive (got {args.beta})")
    return run_stage(args, "dpo", make_stage)
