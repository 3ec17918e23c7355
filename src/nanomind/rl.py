"""Reinforcement learning from rewards: GRPO, DAPO, CISPO and PPO on the shared training loop.

  nanomind rl --algo grpo --data rl.jsonl --init-from runs/sft/model --out runs/grpo --reward math
  nanomind rl --algo ppo --critic separate --data rl.jsonl --init-from runs/sft/model --out runs/ppo

Each rollout, every process takes `--batch-size` prompts and samples `--num-generations` (G) completions
of each, all decoded together by the batched KV-cache generator. The rewards score them; one no-grad
forward of the same model in the training layout gives the rollout policy's log-probabilities (and the
reference's and the critic's, when there are ones). Then the rollout is cut into `--minibatches`
minibatches, `--ppo-epochs` times over; each minibatch is one optimizer step of the shared loop. From
the second minibatch on the policy has moved, so the importance ratio r = pi / pi_rollout is real and
the clipping acts. (MiniMind does one step per rollout, so its ratio is always 1.) The training forward
goes through the DDP-wrapped model, so gradients are averaged over processes.

Per completion token t, with A the advantage and r the ratio (log-probabilities at the sampling
temperature, so r compares with the distribution the tokens were drawn from):
  grpo   A = (R - mean_group) / (std_group + eps);  -min(r A, clip(r, 1 - low, 1 + high) A) + beta k3
         averaged per sequence, then over sequences
  dapo   grpo's loss with clip-higher (0.2 / 0.28), averaged over all tokens of the step; groups whose
         rewards are all equal (no signal) are replaced by fresh prompts; a soft penalty on completions
         that run into the last --overlong-buffer tokens
  cispo  -sg(clip(r, 1 - low, 1 + high)) A log pi + beta k3: every token keeps its gradient, the
         weight is clipped instead (MiniMax-M1)
  ppo    a value model (a separate critic, or a head on the policy's own last hidden state), GAE over
         per-token rewards (-kl_coef * log(pi_rollout / pi_ref), plus the reward on the last token),
         whitened advantages, the clipped surrogate plus vf_coef * the clipped value loss
k3 = exp(ref - logp) - (ref - logp) - 1 estimates KL(pi || ref); with --beta 0 there is no reference
model in memory.

Agent RL (multi-turn tool use) runs on agent data: a folder prepared with `nanomind prepare --kind agent`,
or raw JSONL with --agent (which prepares it as agent data):

  nanomind rl --algo grpo --agent --data agent_rl.jsonl --init-from runs/sft/model --out runs/agent

A rollout is then `agent.run_agents`: all prompts x G trajectories decode together, turn by turn, for up
to --max-turns replies; the tools (built-in, --tools world, or --tools FILE) run between turns and their results are
what the model reads next. A trajectory also ends when another reply of --max-new-tokens would not fit
in --max-total-len tokens. It trains on exactly the tokens the model sampled (Trajectory.mask: each
reply and its end-of-turn token); the prompt, the tool results and the template text around them are in
the input but never a target. One trajectory is one sample: its reward (by default `math` on the final
answer against the gt list plus 0.5 x `tool_calls`, valid calls against len(gt), over all its turns) gives
one advantage for all its tokens (grpo, dapo, cispo). PPO's GAE steps from model token to model token:
the tool results and template text between two replies are the environment's transition, not steps,
so the last token of a reply bootstraps from the value at the first token of the next one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .agent import Trajectory, run_agents
from .data import conversation_tools
from .generation import SamplingParams, decode_tokens
from .model import NanoMind
from .prepare import load_manifest
from .tools import resolve_tools, tool_schemas
from .trainer import (RowSampler, Stage, StageInputs, TrainingError, autocast_context, load_full_weights, run_stage,
                      save_full_model, unwrap)

ALGORITHMS = ("grpo", "dapo", "cispo", "ppo")
VALUE_PREFIXES = ("value_head.", "critic.")  # parameters of the value model, inside the policy module
VALUE_FILE = "value_model.safetensors"  # where checkpoints keep them, next to the plain policy weights
AGENT_REWARDS = ["math=1", "tool_calls=0.5"]  # agent data's default: the final answer, then the calls
END_REASONS = ("answer", "max_turns", "length", "context")  # why a trajectory stopped (Trajectory.end)
ASSISTANT_TURN = "<|im_start|>assistant"  # where the chat template starts an assistant turn


# ----------------------------------------------------------------------------------------------
# The losses, on tensors. Per-token tensors are (B, T) in the training layout (see training_layout);
# `mask` marks the completion tokens.


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> log-probability of each target (fp32), 0 where targets == -100."""
    mask = targets != -100
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    logps[mask] = -F.cross_entropy(logits[mask].float() / temperature, targets[mask], reduction="none")
    return logps


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward against its group of G samples of the same prompt, (r - mean) / (std + eps)
    with the population std. Rewards are grouped consecutively: (N,) -> (N,)."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, correction=0, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def clipped_surrogate(logps, old_logps, advantages, clip_low: float, clip_high: float):
    """PPO's clipped objective as a per-token loss, and where the clip is active (no gradient there)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def cispo_loss(logps, old_logps, advantages, clip_low: float, clip_high: float):
    """CISPO: the REINFORCE loss weighted by the clipped, stop-gradient ratio; and where it is clipped."""
    ratio = torch.exp(logps - old_logps).detach()
    weight = ratio.clamp(1 - clip_low, 1 + clip_high)
    return -weight * advantages * logps, weight != ratio


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): unbiased, always >= 0."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_value_loss(values, old_values, returns, clip: float) -> torch.Tensor:
    """PPO's value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within clip of the rollout's value."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens (mask), in order; the episode
    ends after the last one. The step after a token is the row's next masked token: positions outside the
    mask between two of them (an agent's tool results and template text) are part of the environment's
    transition, not steps. Returns (advantages, returns = advantages + values), 0 outside the mask."""
    mask = mask.bool()
    # The masked positions first, in order: each row's steps become a contiguous prefix.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    steps = mask.gather(1, order).to(values.dtype)
    r, v = rewards.gather(1, order), values.gather(1, order)
    continues = torch.cat([steps[:, 1:], torch.zeros_like(steps[:, :1])], 1)  # the next step is the episode's
    deltas = r + gamma * torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1) * continues - v
    packed = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(int(steps.sum(1).max()) if steps.numel() else 0)):  # up to the longest episode
        last = deltas[:, t] + gamma * lam * continues[:, t] * last
        packed[:, t] = last
    advantages = torch.zeros_like(values).scatter(1, order, packed * steps)
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, all_reduce_sum=None) -> torch.Tensor:
    """Zero mean and unit variance over the masked entries; with `all_reduce_sum`, over every process's
    entries, so that one advantage means the same on every rank of a DDP run."""
    reduce = all_reduce_sum or (lambda x: x)
    picked = values[mask]
    count, total = reduce(torch.stack([picked.new_tensor(float(picked.numel())), picked.sum()])).tolist()
    mean = total / max(count, 1.0)
    # Squared deviations from the shared mean, not E[x^2] - mean^2, which cancels badly in fp32.
    variance = reduce((picked - mean).square().sum()).item() / max(count, 1.0)
    return torch.where(mask, (values - mean) / (variance ** 0.5 + eps), 0.0)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer tokens, then falling linearly to -1 at
    max_length."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    return ((max_length - buffer - lengths.float()) / buffer).clamp(-1.0, 0.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Sum of the loss over the batch's units: tokens ("token"), or sequences, each the mean over its
    tokens ("sequence"). The loop divides by the step's total number of units."""
    per_token = torch.where(mask, per_token, 0.0)
    if level == "token":
        return per_token.sum()
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def training_layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                    masks: list[list[int]] | None = None):
    """Right-padded rows [prompt, completion, pad...] -> inputs (N, W-1), targets (N, W-1) holding the
    completion tokens where they are predicted (-100 elsewhere), and each row's length (N,). With
    `masks` (one per completion, 1 on the tokens to train: an agent's replies), only those are targets."""
    lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)])
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    targets = torch.full_like(tokens, -100)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        tokens[row, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        completion = torch.tensor(c, dtype=torch.long)
        if masks is not None:
            completion[~torch.tensor(masks[row], dtype=torch.bool)] = -100
        targets[row, len(p):len(p) + len(c)] = completion
    return tokens[:, :-1], targets[:, 1:], lengths


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class RLSettings:
    algo: str = "grpo"
    num_generations: int = 8
    max_new_tokens: int = 256
    max_prompt_len: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    thinking_ratio: float = 0.0
    ppo_epochs: int = 2
    minibatches: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # k3 KL to the reference, in the loss (grpo, dapo, cispo)
    loss_agg: str = "sequence"
    dynamic_sampling: bool = False
    max_resample: int = 3
    overlong_buffer: int = 0
    critic: str = "separate"
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    value_clip: float = 0.2
    kl_coef: float = 0.0  # KL penalty in the per-token reward (ppo)
    agent: bool = False  # multi-turn tool use: set by the data kind (see main)
    max_turns: int = 3  # agent: most replies per trajectory
    max_total_len: int | None = None  # agent: longest trajectory; None: 1024 or the model's context if shorter
    tools: str | None = None  # agent: a Python file of tool functions, or "world[:SEED]"; None: the built-in tools

    @property
    def needs_reference(self) -> bool:
        return (self.kl_coef if self.algo == "ppo" else self.beta) > 0

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches


def algorithm_defaults(algo: str, max_new_tokens: int) -> dict:
    """What each algorithm means by default (flags left unset take these)."""
    return {
        "grpo": {"clip_low": 0.2, "clip_high": 0.2, "loss_agg": "sequence", "num_generations": 8},
        "dapo": {"clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token", "num_generations": 8,
                 "dynamic_sampling": True, "overlong_buffer": max_new_tokens // 4},
        # No lower bound; the weight is capped at 5 as in MiniMind's CISPO.
        "cispo": {"clip_low": 1.0, "clip_high": 4.0, "loss_agg": "token", "num_generations": 8},
        "ppo": {"clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token", "num_generations": 1, "kl_coef": 0.02},
    }[algo]


def settings_from_args(args) -> RLSettings:
    """RLSettings from the command line: each flag left unset takes the algorithm's default."""
    if args.algo not in ALGORITHMS:
        raise TrainingError(f"unknown --algo {args.algo!r}; choose one of {', '.join(ALGORITHMS)}")
    chosen = {name: getattr(args, name) for name in RLSettings.__dataclass_fields__
              if getattr(args, name, None) is not None}
    s = RLSettings(**{**algorithm_defaults(args.algo, args.max_new_tokens), **chosen})
    if s.algo == "ppo" and s.beta:
        raise TrainingError("PPO puts the KL to the reference in the reward: use --kl-coef, not --beta")
    if s.algo != "ppo" and getattr(args, "kl_coef", None) is not None:
        raise TrainingError(f"{s.algo} puts the KL to the reference in the loss: use --beta, not --kl-coef")
    if s.temperature <= 0:
        raise TrainingError("--temperature must be > 0: RL learns from sampled completions")
    if s.num_generations < (1 if s.algo == "ppo" else 2):
        raise TrainingError(f"--num-generations must be >= 2 for {s.algo} (advantages compare samples of a prompt)")
    if s.dynamic_sampling and s.num_generations < 2:
        raise TrainingError("dynamic sampling compares the samples of a prompt: it needs --num-generations >= 2")
    if min(s.ppo_epochs, s.minibatches, s.max_new_tokens, s.max_turns) < 1:
        raise TrainingError("--ppo-epochs, --minibatches, --max-new-tokens and --max-turns must be >= 1")
    return s


# ----------------------------------------------------------------------------------------------
# The value model (PPO): a scalar head on the policy's last hidden state, or a separate critic (a copy
# of the policy whose LM head is replaced by the scalar head). Either is a submodule of the policy, so
# the loop's optimizer, DDP and checkpoints see its parameters; save_policy keeps them out of the model.


class ValueHead(nn.Linear):
    """Hidden state -> scalar value; starts at zero, so the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def add_value_model(model: NanoMind, kind: str) -> None:
    if kind == "shared":
        model.value_head = ValueHead(model.config.hidden_size).to(model.lm_head.weight.device)
    elif kind == "separate":
        critic = copy.deepcopy(model)
        critic.lm_head = ValueHead(model.config.hidden_size).to(model.lm_head.weight.device)  # unties it
        model.critic = critic
    else:
        raise TrainingError(f"unknown --critic {kind!r}; choose shared or separate")


def value_predictions(model, out, inputs: torch.Tensor) -> torch.Tensor:
    """(B, T) values of the states that predict each next token; `model` may be DDP-wrapped."""
    policy = unwrap(model)
    if hasattr(policy, "value_head"):
        return policy.value_head(out.hidden_states).squeeze(-1).float()
    return policy.critic(inputs).logits.squeeze(-1).float()


def save_policy(model, folder: Path, tokenizer, weights: dict, write_extra=None) -> None:
    """A plain nanomind checkpoint of the policy; the value model's weights (PPO) go to VALUE_FILE beside it."""
    value = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()
             if k.startswith(VALUE_PREFIXES)}

    def extra(folder: Path) -> None:
        if value:
            save_file(value, folder / VALUE_FILE)
        if write_extra is not None:
            write_extra(folder)

    save_full_model(model, folder, tokenizer, {k: v for k, v in weights.items() if not k.startswith(VALUE_PREFIXES)},
                    extra)


def load_policy(model, folder: Path) -> dict:
    weights = load_full_weights(model, folder)
    if (Path(folder) / VALUE_FILE).exists():
        weights.update(load_file(Path(folder) / VALUE_FILE))
    return weights


# ----------------------------------------------------------------------------------------------
# The loss the loop calls on each micro-batch


class PolicyLoss:
    """loss_fn(model, batch): the algorithm's per-token loss, aggregated; metrics per micro-batch. The
    rollout's statistics ride along in the batch as `stat_*` scalars and come out as metrics."""

    def __init__(self, s: RLSettings):
        self.s = s

    def count(self, batch: dict) -> torch.Tensor:
        mask = batch["targets"] != -100
        return mask.sum() if self.s.loss_agg == "token" else torch.tensor(mask.shape[0], device=mask.device)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        s = self.s
        out = model(batch["inputs"])
        targets = batch["targets"]
        mask = targets != -100
        logps = token_logps(out.logits, targets, s.temperature)
        old_logps, advantages = batch["old_logps"], batch["advantages"]
        if s.algo == "cispo":
            per_token, clipped = cispo_loss(logps, old_logps, advantages, s.clip_low, s.clip_high)
        else:
            per_token, clipped = clipped_surrogate(logps, old_logps, advantages, s.clip_low, s.clip_high)

        def mean(x):
            return x.detach()[mask].float().mean()

        log_ratio = (logps - old_logps).detach()
        metrics = {"clip_fraction": mean(clipped), "ratio": mean(log_ratio.exp()),
                   "approx_kl_rollout": mean(0.5 * log_ratio ** 2)}
        if "ref_logps" in batch:
            kl = k3_kl(logps, batch["ref_logps"])
            metrics["kl"] = mean(kl)
            if s.algo != "ppo":
                per_token = per_token + s.beta * kl
        if s.algo == "ppo":
            values = value_predictions(model, out, batch["inputs"])
            value_loss = clipped_value_loss(values, batch["old_values"], batch["returns"], s.value_clip)
            per_token = per_token + s.vf_coef * value_loss
            metrics.update(value_loss=mean(value_loss), value=mean(values))
        with torch.no_grad():
            picked = out.logits[mask].float() / s.temperature
            entropy = torch.logsumexp(picked, -1) - (picked.softmax(-1) * picked).sum(-1)
        metrics["entropy"] = entropy.mean()
        units = self.count(batch)
        loss_sum = aggregate(per_token, mask, s.loss_agg)
        if out.aux_loss is not None:
            loss_sum = loss_sum + unwrap(model).config.router_aux_loss_coef * out.aux_loss * units
            metrics["aux_loss"] = out.aux_loss.detach()
        metrics.update({k[len("stat_"):]: v for k, v in batch.items() if k.startswith("stat_")})
        return loss_sum, units, metrics


# ----------------------------------------------------------------------------------------------
# Rollouts: the loop's batch source


@dataclass
class Group:
    """One prompt and its G samples, not yet scored, then scored. A sample is a completion (its token ids
    end with EOS when the model stopped); with agent data, a trajectory after its prompt up to its last
    reply, whose `masks` mark the tokens the model sampled (its tool results and template text are 0)."""

    record: dict
    prompt: str  # the templated prompt text the policy continued (what the rewards get as the prompt)
    prompt_ids: list[int]
    completions: list[list[int]]
    texts: list[str]  # what the rewards judge: the answer; for a trajectory its assistant turns (replies_text)
    stopped: list[bool]  # the model ended the sample itself (not cut at --max-new-tokens)
    masks: list[list[int]] | None = None  # agent: 1 on the model's tokens of each completion
    trajectories: list[Trajectory] | None = None  # agent: run_agents' record of each sample
    rewards: torch.Tensor | None = None  # (G,)
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def informative(self) -> bool:
        """Whether its rewards differ, so its advantages are not all zero."""
        return bool(self.rewards.max() > self.rewards.min())

    def written(self) -> list[int]:
        """How many tokens the model sampled in each sample."""
        return [len(c) for c in self.completions] if self.masks is None else [sum(m) for m in self.masks]

    def longest_replies(self) -> list[int]:
        """The length of each sample's longest reply (a completion is one reply)."""
        if self.masks is None:
            return [len(c) for c in self.completions]
        return [max((b - a for a, b in mask_runs(m)), default=0) for m in self.masks]


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s: a trajectory's replies."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def model_span(t: Trajectory) -> tuple[list[int], list[int]]:
    """A trajectory's tokens after its prompt, up to its last reply, and their mask. What follows the last
    reply (the results of calls the model never got to read) is cut: nothing there is trained, and it
    would only make the row longer than --max-total-len."""
    end = max((i + 1 for i, m in enumerate(t.mask) if m), default=t.prompt_length)
    return t.token_ids[t.prompt_length:end], t.mask[t.prompt_length:end]


def replies_text(tokenizer, t: Trajectory) -> str:
    """What the rewards judge of a trajectory: its assistant turns, each reply after the generation prompt
    it continued, in order (the last one holds the final answer), without the tool results between them:
    those are the tools' words, not the model's (an error message even quotes tool-call tags). So `math`
    reads the last turn's answer and `tool_calls` counts the calls of every turn."""
    text, start = "", t.prompt_length
    for a, b in mask_runs(t.mask):
        if a > start:  # the tool turn and the next generation prompt: keep the prompt only
            between = tokenizer.decode(t.token_ids[start:a])
            text += between[max(between.rfind(ASSISTANT_TURN), 0):]
        text += tokenizer.decode(t.token_ids[a:b])
        start = b
    return text


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class RolloutBatches:
    """Generates a rollout when the previous one is used up, then hands the loop one minibatch per step,
    cut into the step's micro-batches. Same interface as trainer.RowBatches.

    Each process draws its own prompts (RowSampler shards them) and samples with its own seed; the
    sampler advances identically everywhere, even with dynamic sampling, so a checkpoint's position
    is every process's. A resume starts with a fresh rollout: it is exact when --save-every is a
    multiple of the steps per rollout (ppo_epochs x minibatches). With `tools` (agent data) a sample
    is a multi-turn trajectory that runs them."""

    def __init__(self, model: NanoMind, tokenizer, prompts, s: RLSettings, reward_fn, run, device,
                 batch_size: int, grad_accum: int, seed: int, precision: str = "auto",
                 reference: NanoMind | None = None, sample_every: int = 0, tools: list | None = None):
        self.model, self.tokenizer, self.prompts, self.s, self.reward_fn = model, tokenizer, prompts, s, reward_fn
        self.run, self.device, self.batch_size, self.grad_accum, self.seed = run, device, batch_size, grad_accum, seed
        self.reference, self.sample_every, self.tools = reference, sample_every, tools
        self.autocast = autocast_context(device, precision)
        self.sampler = RowSampler(len(prompts), batch_size, run, seed)
        self.eos_ids = {tokenizer.eos_id, tokenizer.pad_id}
        self.rollouts = 0
        self.plan: list[torch.Tensor] = []  # row indices of the minibatches still to train on
        rows = batch_size * s.num_generations
        if rows < s.minibatches * grad_accum:
            raise TrainingError(f"a rollout of {rows} completions per process (--batch-size x --num-generations) "
                                f"cannot fill {s.minibatches} minibatches x {grad_accum} micro-batches")

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch * self.s.steps_per_rollout * self.grad_accum

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.rollouts, self.plan = state["rollouts"], []

    def next_batches(self, n: int) -> list[dict]:
        if not self.plan:
            self._rollout()
        return [self._micro_batch(rows) for rows in self.plan.pop(0).tensor_split(n)]

    # -- one rollout ---------------------------------------------------------------------------

    def _rollout(self) -> None:
        s, model = self.s, self.model
        model.eval()
        kept, generated = self._sample_groups()
        model.train()
        G = s.num_generations
        prompts = [g.prompt_ids for g in kept for _ in range(G)]
        completions = [c for g in kept for c in g.completions]
        masks = [m for g in kept for m in g.masks] if self.tools is not None else None
        inputs, targets, self.lengths = training_layout(prompts, completions, self.tokenizer.pad_id, masks)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        mask = targets != -100
        rewards = torch.cat([g.rewards for g in kept]).to(self.device)
        data = {"inputs": inputs, "targets": targets, **self._score(inputs, targets)}

        if s.algo == "ppo":
            token_rewards = torch.zeros_like(data["old_logps"])
            if "ref_logps" in data:
                token_rewards -= s.kl_coef * (data["old_logps"] - data["ref_logps"]) * mask
            # The input position that predicts the last token (an agent's row ends with its last reply).
            last = self.lengths.to(self.device) - 2
            token_rewards[torch.arange(len(last), device=self.device), last] += rewards
            advantages, data["returns"] = gae(token_rewards, data["old_values"], mask, s.gamma, s.lam)
            data["advantages"] = whiten(advantages, mask, all_reduce_sum=self.run.all_reduce_sum)
        else:
            data["advantages"] = group_advantages(rewards, G)[:, None] * mask
        self.groups, self.data = kept, data  # the rollout being trained on
        self.stats = self._statistics(generated, kept)

        g = torch.Generator().manual_seed(_seed(self.seed, "plan", self.rollouts, self.run.rank))
        self.plan = [rows for _ in range(s.ppo_epochs)
                     for rows in torch.randperm(len(completions), generator=g).tensor_split(s.minibatches)]
        if self.run.is_main and self.sample_every:
            first_step = self.rollouts * s.steps_per_rollout
            if (-first_step) % self.sample_every < s.steps_per_rollout:
                group = generated[0]
                print(f"  rollout {self.rollouts}: {group.record['conversations'][-1]['content']!r} -> "
                      f"{group.texts[0]!r} (reward {group.rewards[0].item():.3f})")
        self.rollouts += 1

    def _sample_groups(self) -> tuple[list[Group], list[Group]]:
        """batch_size groups to train on, and every group generated. With dynamic sampling, groups whose
        rewards are all equal are set aside and fresh prompts drawn, up to max_resample more rounds; if
        some are still missing, set-aside groups fill in (their advantages are zero)."""
        s = self.s
        kept, dropped, generated = [], [], []
        for round_ in range(1 + (s.max_resample if s.dynamic_sampling else 0)):
            indices = self.sampler.next_rows()  # every process draws each round, so samplers stay aligned
            if len(kept) < self.batch_size:
                groups = self._generate(self.prompts.rows(indices), _seed(self.seed, self.rollouts, round_,
                                                                          self.run.rank))
                generated += groups
                for group in groups:
                    (kept if group.informative or not s.dynamic_sampling else dropped).append(group)
            if not s.dynamic_sampling:
                break
            missing = torch.tensor(float(max(self.batch_size - len(kept), 0)), device=self.device)
            if self.run.all_reduce_sum(missing).item() == 0:
                break
        return (kept + dropped)[:self.batch_size], generated

    @torch.no_grad()
    def _generate(self, records: list[dict], seed: int) -> list[Group]:
        """Sample G completions (agent data: trajectories) of each prompt, all rows decoded together, and
        score them."""
        s, G = self.s, self.s.num_generations
        draw = random.Random(seed)
        thinking = [draw.random() < s.thinking_ratio for _ in records]
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, seed=seed)
        with self.autocast:
            groups = (self._sample_trajectories if self.tools is not None else self._sample_completions)(
                records, thinking, params)
        rewards, components = self.reward_fn([g.prompt for g in groups for _ in range(G)],
                                             [text for g in groups for text in g.texts],
                                             [g.record for g in groups for _ in range(G)])
        rewards = torch.as_tensor(rewards).float().cpu()
        components = {k: torch.as_tensor(v).float().cpu() for k, v in components.items()}
        if s.overlong_buffer:  # on an agent's longest reply: the one closest to the limit
            longest = torch.tensor([n for g in groups for n in g.longest_replies()])
            penalty = overlong_penalty(longest, s.max_new_tokens, s.overlong_buffer)
            rewards, components = rewards + penalty, {**components, "overlong": penalty}
        for i, group in enumerate(groups):
            group.rewards = rewards[i * G:(i + 1) * G]
            group.components = {k: v[i * G:(i + 1) * G] for k, v in components.items()}
        return groups

    def _sample_completions(self, records: list[dict], thinking: list[bool], params: SamplingParams) -> list[Group]:
        """One reply per sample, G per prompt, all rows decoded together by the KV-cached generator."""
        tokenizer, G = self.tokenizer, self.s.num_generations
        texts = [render_prompt(tokenizer, r, thinking=th) for r, th in zip(records, thinking)]
        prompt_ids = tokenizer.encode_batch(texts)
        rows = [ids for ids in prompt_ids for _ in range(G)]
        params = dataclasses.replace(params, eos_ids=list(self.eos_ids))
        completions, stopped = [[] for _ in rows], [False] * len(rows)
        for next_ids in decode_tokens(self.model, rows, params):
            for i, token in enumerate(next_ids):
                if not stopped[i]:
                    completions[i].append(token)
                    stopped[i] = token in self.eos_ids
            if all(stopped):
                break
        answers = [tokenizer.decode(c[:-1] if done else c) for c, done in zip(completions, stopped)]
        return [Group(records[i], texts[i], prompt_ids[i], completions[i * G:(i + 1) * G],
                      answers[i * G:(i + 1) * G], stopped[i * G:(i + 1) * G]) for i in range(len(records))]

    def _sample_trajectories(self, records: list[dict], thinking: list[bool], params: SamplingParams) -> list[Group]:
        """G multi-turn trajectories per prompt, all decoded together turn by turn, the tools run between turns."""
        s, tokenizer, G = self.s, self.tokenizer, self.s.num_generations
        trajectories = run_agents(self.model, tokenizer, [r["conversations"] for r in records for _ in range(G)],
                                  self.tools, params, s.max_turns, [th for th in thinking for _ in range(G)],
                                  max_length=s.max_total_len)
        groups = []
        for i, record in enumerate(records):
            samples = trajectories[i * G:(i + 1) * G]
            prompt_ids = samples[0].token_ids[:samples[0].prompt_length]
            spans = [model_span(t) for t in samples]
            groups.append(Group(record, tokenizer.decode(prompt_ids), prompt_ids, [c for c, _ in spans],
                                [replies_text(tokenizer, t) for t in samples], [t.end != "length" for t in samples],
                                masks=[m for _, m in spans], trajectories=samples))
        return groups

    @torch.no_grad()
    def _score(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """The rollout policy's (and the reference's, the critic's) per-token values, from the same model
        and layout the training forward uses (not the decoder's KV-cached, left-padded one), so on the
        first pass over a rollout the ratio is 1 up to float rounding and the clip starts inactive."""
        s = self.s
        scores = {"old_logps": torch.zeros(targets.shape, device=self.device)}
        if self.reference is not None:
            scores["ref_logps"] = torch.zeros_like(scores["old_logps"])
        if s.algo == "ppo":
            scores["old_values"] = torch.zeros_like(scores["old_logps"])
        micro = max(1, len(inputs) // (s.minibatches * self.grad_accum))
        for rows in torch.arange(len(inputs), device=self.device).split(micro):
            width = int(self.lengths[rows.cpu()].max()) - 1
            x, y = inputs[rows, :width], targets[rows, :width]
            with self.autocast:
                out = self.model(x)
                scores["old_logps"][rows, :width] = token_logps(out.logits, y, s.temperature)
                if s.algo == "ppo":
                    scores["old_values"][rows, :width] = value_predictions(self.model, out, x)
                if self.reference is not None:
                    scores["ref_logps"][rows, :width] = token_logps(self.reference(x).logits, y, s.temperature)
        return scores

    def _statistics(self, generated: list[Group], kept: list[Group]) -> dict[str, torch.Tensor]:
        rewards = torch.cat([g.rewards for g in generated])
        stats = {"reward": rewards.mean(), "reward_std": rewards.std(correction=0),
                 "response_length": torch.tensor([n for g in generated for n in g.written()]).float().mean(),
                 "truncated": torch.tensor([not d for g in generated for d in g.stopped]).float().mean()}
        if self.s.num_generations > 1:  # groups whose advantages are all zero
            stats["uniform_groups"] = torch.tensor([not g.informative for g in generated]).float().mean()
        if self.s.dynamic_sampling:
            stats["uninformative_kept"] = torch.tensor([not g.informative for g in kept]).float().mean()
        for name in generated[0].components:
            stats[f"reward_{name}"] = torch.cat([g.components[name] for g in generated]).mean()
        if self.tools is not None:  # per trajectory; every end reason always, so all processes log the same keys
            samples = [t for g in generated for t in g.trajectories]
            calls = sum(len(t.tool_calls) for t in samples)
            stats.update(tool_calls=torch.tensor(calls / len(samples)),
                         invalid_call_share=torch.tensor(sum(t.invalid_calls for t in samples) / max(calls, 1)),
                         turns=torch.tensor(sum(len(t.replies) for t in samples) / len(samples)))
            for reason in END_REASONS:
                stats[f"end_{reason}"] = torch.tensor(sum(t.end == reason for t in samples) / len(samples))
        return {f"stat_{k}": v.float().to(self.device) for k, v in stats.items()}

    def _micro_batch(self, rows: torch.Tensor) -> dict:
        width = int(self.lengths[rows].max()) - 1
        rows = rows.to(self.device)
        return {**{k: v[rows, :width] for k, v in self.data.items()}, **self.stats}


def render_prompt(tokenizer, record: dict, thinking: bool = False, tools: list | None = None) -> str:
    """The record's prompt as the policy reads it; `tools` are the schemas offered when the record carries
    none (agent rollouts offer the tools they run, as run_agents does)."""
    messages = record["conversations"]
    return tokenizer.apply_chat_template(messages, tools=conversation_tools(messages) or tools,
                                         add_generation_prompt=True, open_thinking=thinking)


class PromptPool:
    """The prompt records that fit --max-prompt-len tokens (rendered), as rows for RowSampler."""

    def __init__(self, rows, tokenizer, max_prompt_len: int, tools: list | None = None):
        records = rows.rows(range(len(rows)))
        lengths = [len(ids) for ids in tokenizer.encode_batch([render_prompt(tokenizer, r, tools=tools)
                                                               for r in records])]
        self.records = [r for r, n in zip(records, lengths) if n <= max_prompt_len]
        self.dropped = len(records) - len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, indices) -> list[dict]:
        return [self.records[int(i)] for i in indices]


# ----------------------------------------------------------------------------------------------
# Rewards


def reward_function(specs: list[str], tokenizer, reward_model: Path | None = None, device="cpu"):
    """--reward NAME[=WEIGHT] ... (and --reward-model DIR, weight 1) -> fn(prompts, completions, samples)
    -> (total (N,), {name: (N,)}). A prompt is the templated text the policy continued."""
    from .rewards import RewardModel, RewardSet

    reward_set = RewardSet.parse(specs, tokenizer=tokenizer)
    if reward_model is not None:
        scorer = RewardModel(reward_model, device=str(device))
        reward_set = RewardSet([*reward_set.rewards, ("reward_model", scorer, 1.0)])

    def score(prompts: list[str], completions: list[str], samples: list[dict]):
        scores = reward_set.score(prompts, completions, samples)
        return torch.tensor(scores.total), {name: torch.tensor(v) for name, v in scores.components.items()}

    return score


# ----------------------------------------------------------------------------------------------
# The stage


def make_stage(inputs: StageInputs, s: RLSettings, reward_fn=None) -> Stage:
    args, model, run = inputs.args, inputs.model, inputs.run
    model.to(inputs.device)
    if reward_fn is None:
        reward_fn = reward_function(args.reward or (AGENT_REWARDS if s.agent else ["math"]), inputs.tokenizer,
                                    args.reward_model, inputs.device)
    context = model.config.max_position_embeddings
    tools, limit = None, ("the model's context", context)
    if s.agent:
        tools = resolve_tools(s.tools)
        s = dataclasses.replace(s, max_total_len=s.max_total_len or min(1024, context))
        if s.max_total_len > context:
            raise TrainingError(f"--max-total-len {s.max_total_len} exceeds the model's context of {context} positions")
        limit = ("--max-total-len", s.max_total_len)
    prompts = PromptPool(inputs.train_rows, inputs.tokenizer, s.max_prompt_len,
                         tool_schemas(tools) if tools is not None else None)
    if len(prompts) == 0:
        raise TrainingError(f"no prompt fits --max-prompt-len {s.max_prompt_len} tokens")
    if s.max_prompt_len + s.max_new_tokens > limit[1]:
        raise TrainingError(f"--max-prompt-len + --max-new-tokens ({s.max_prompt_len + s.max_new_tokens}) exceeds "
                            f"{limit[0]} ({limit[1]} positions): lower one of them")
    reference = copy.deepcopy(model).eval().requires_grad_(False) if s.needs_reference else None
    if s.algo == "ppo":
        add_value_model(model, s.critic)
    source = RolloutBatches(model, inputs.tokenizer, prompts, s, reward_fn, run, inputs.device, args.batch_size,
                            args.grad_accum, args.seed, args.precision, reference, args.sample_every, tools)
    if run.is_main:
        rollout = args.batch_size * s.num_generations
        print(f"rl: {s.algo} on {len(prompts)} {'agent ' if s.agent else ''}prompts"
              + (f" ({prompts.dropped} longer than --max-prompt-len skipped)" if prompts.dropped else "")
              + f" | {args.batch_size} prompts x {s.num_generations} samples per process per rollout, "
              f"{s.ppo_epochs} pass(es) x {s.minibatches} minibatches of ~{rollout // s.minibatches} | clip "
              f"{s.clip_low}/{s.clip_high}, {s.loss_agg}-level loss"
              + (f" | reference: a frozen copy (KL {s.kl_coef if s.algo == 'ppo' else s.beta})" if reference else "")
              + (f" | value model: {s.critic}" if s.algo == "ppo" else "")
              + (f" | agent: up to {s.max_turns} turns of {len(tools)} tools "
                 f"({', '.join(t.name for t in tools)}), {s.max_total_len} tokens at most" if s.agent else ""))
        if args.save_every and args.save_every % s.steps_per_rollout:
            print(f"rl: note: --save-every {args.save_every} is not a multiple of the {s.steps_per_rollout} steps "
                  "per rollout; a resume from such a checkpoint starts a fresh rollout")
    loss = PolicyLoss(s)
    user_prompts = [r["conversations"][-1]["content"] for r in prompts.rows(range(min(2, len(prompts))))]
    return Stage("rl", prompts, None, loss, count_fn=loss.count, sample_prompts=user_prompts, chat_samples=True,
                 save_fn=save_policy, load_fn=load_policy, batch_source=source)


def data_kind(args) -> str:
    """"agent" (multi-turn tool rollouts) for agent data: --agent (raw JSONL is then prepared as agent
    data), or a folder prepared as agent data; else "rl"."""
    if getattr(args, "agent", False):
        return "agent"
    folder = Path(args.data[0])
    if len(args.data) == 1 and (folder / "manifest.json").is_file():
        return "agent" if load_manifest(folder)["kind"] == "agent" else "rl"
    return "rl"


def main(args, reward_fn=None) -> dict:
    """`nanomind rl`; `reward_fn(prompts, completions, samples) -> (rewards, components)` replaces --reward."""
    if args.init_from is None:
        raise TrainingError("rl improves an existing model: pass --init-from CHECKPOINT (usually the SFT model)")
    if args.fsdp:
        raise TrainingError("rl trains under plain DDP (every process generates with the whole model); drop --fsdp")
    kind = data_kind(args)
    s = dataclasses.replace(settings_from_args(args), agent=kind == "agent")
    return run_stage(args, kind, lambda inputs: make_stage(inputs, s, reward_fn))
