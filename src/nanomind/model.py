"""The nanomind model: a decoder-only transformer, architecture-identical to Qwen3 / Qwen3-MoE.

Read top to bottom: config and presets, the linear layer, RMSNorm, rotary embeddings (with optional
YaRN), the KV cache, attention, the SwiGLU MLP, the mixture-of-experts layer, the block, the model.

Parameter names match Hugging Face's Qwen3 one to one (`model.layers.0.self_attn.q_proj.weight`,
`model.layers.0.mlp.experts.3.down_proj.weight`, ...), so a checkpoint is a state dict away from
`transformers.Qwen3ForCausalLM` (see checkpoint.py).

Shapes in comments: B batch, T new tokens, S attended positions (cached + new), H heads,
K key/value heads, D head dim, C hidden size, E experts, N = B*T tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Configuration


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind-3's MLP width: hidden * pi, rounded up to a multiple of 64 (768 -> 2432)."""
    return math.ceil(hidden_size * math.pi / 64) * 64


@dataclass
class ModelConfig:
    """Hyper-parameters. Field names follow Hugging Face's Qwen3Config so config.json maps directly."""

    vocab_size: int = 6400
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 96
    intermediate_size: int = 2432
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    # YaRN context extension, e.g. {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048}.
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # Mixture of experts: num_experts == 0 means a dense MLP in every block.
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 2432
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4
    # Token ids the model was trained with (MiniMind's tokenizer: pad 0, bos 1, eos 2).
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        return asdict(self)


# One table of presets; every field can be overridden (`preset_config("small", num_hidden_layers=4)`).
PRESETS: dict[str, dict] = {
    # For tests and the CPU demo: ~1M parameters with the 6400 vocabulary.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=default_intermediate_size(128)),
    # MiniMind2-small, 26M.
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=64, intermediate_size=1408),
    # MiniMind-3, 64M.
    "base": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=96, intermediate_size=2432),
    # MiniMind-3-MoE: 4 experts, top-1, 198M total / 64M active.
    "base-moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=96, intermediate_size=2432, num_experts=4, num_experts_per_tok=1,
                     moe_intermediate_size=2432),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(ModelConfig(**PRESETS[name]), **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Linear layers


ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, as F.linear; outside autograd, a large fp32 weight on the CPU with few rows of x
    goes through oneDNN (the kernel torch.compile's CPU inference uses) instead of MKL.

    Batch-1 decoding is little more than one matrix-vector product per weight. On a 2-core AVX2 AMD
    EPYC, MKL's fp32 path for few rows read the weights at 6.5 GB/s and oneDNN at 9-10 GB/s, which
    made the `base` model decode about 1.5x faster (benchmarks/RESULTS.md). For small weights, for
    many rows and for anything with a backward MKL was as fast or faster, so those keep F.linear.
    """
    if (ONEDNN_LINEAR and not torch.is_grad_enabled() and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.numel() >= 1 << 18 and x.numel() <= 1024 * x.shape[-1]):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear without bias (as every Qwen3 projection), multiplying through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


# ----------------------------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # One fused kernel: decoding runs dozens of norms per token on a single row each.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Statistics in fp32 even under bf16: the mean of squares overflows / loses precision otherwise.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half convention), with optional YaRN


def rope_inverse_frequencies(config: ModelConfig, use_yarn: bool) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds (D/2,) and the factor cos/sin are scaled by (YaRN's attention factor)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not use_yarn:
        return inv_freq, 1.0
    s = config.rope_scaling
    factor, original = float(s["factor"]), s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

    # YaRN keeps fast-rotating pairs (many turns within the original context) as they are,
    # slows down pairs that never complete a turn by `factor`, and ramps linearly in between.
    def pair_index_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index_for_rotations(beta_fast)), 0)
    high = min(math.ceil(pair_index_for_rotations(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Turns positions (B, T) into cos / signed-sin tables (B, 1, T, D) shared by every layer.

    YaRN only switches on when the context in use is longer than the original training length,
    so a model with YaRN enabled behaves exactly as without it on short inputs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.yarn_threshold = None
        inv_freq, scale = rope_inverse_frequencies(config, use_yarn=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = scale
        if config.rope_scaling and config.rope_scaling.get("type", config.rope_scaling.get("rope_type")) == "yarn":
            self.yarn_threshold = config.rope_scaling["original_max_position_embeddings"]
            yarn_inv_freq, self.yarn_scale = rope_inverse_frequencies(config, use_yarn=True)
            self.register_buffer("yarn_inv_freq", yarn_inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.inv_freq, self.scale
        if self.yarn_threshold is not None and context_length > self.yarn_threshold:
            inv_freq, scale = self.yarn_inv_freq, self.yarn_scale
        angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
        cos, sin = angles.cos() * scale, angles.sin() * scale
        # The sign of the rotation's first half is folded into sin once here (see apply_rotary).
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the RotaryEmbedding tables (B, 1, T, D); pairs are (i, i + D/2).

    The rotate-half form is x * cos + (-x2, x1) * sin. (x2, x1) is x rolled by D/2, and the minus
    is already in signed_sin = (-sin, sin): the same numbers in four operations instead of ten,
    which matters when decoding runs them twice per layer per token.
    """
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer; decoding writes in place instead of concatenating.

    `length` counts the positions filled so far (the same for every row: prompts are left-padded).
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) after the filled positions; return everything filled (B, K, S, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


# ----------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size)
        # Qwen3's per-head norms keep q.k logits bounded, which stabilises training without biases.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # Inference only (NanoMind.fuse_projections): the q, k and v weights as row blocks of one matrix,
        # and the q and k norm weights repeated per head, (H + K, D).
        self.qkv_weight: torch.Tensor | None = None
        self.qk_norm_weight: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is not None:
            # Decoding pays per operation, not per number: q and k are normed and rotated as one tensor.
            qk, v = linear(x, self.qkv_weight).split([(H + K) * D, K * D], dim=-1)
            qk = qk.view(B, T, H + K, D)
            qk = F.rms_norm(qk.float(), (D,), eps=self.q_norm.eps).to(qk.dtype) * self.qk_norm_weight
            q, k = apply_rotary(qk.transpose(1, 2), cos, sin).split([H, K], dim=1)
        else:
            q = self.q_norm(self.q_proj(x).view(B, T, H, D)).transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(B, T, K, D)).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, D), (B, K, T, D)
            v = self.v_proj(x)
        v = v.view(B, T, K, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (B, K, S, D)
        # enable_gqa lets each group of H/K query heads read its shared K/V head without copying it.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# ----------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU MLP and mixture of experts


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        # Inference only (NanoMind.fuse_projections): the gate and up weights as row blocks of one matrix.
        self.gate_up_weight: torch.Tensor | None = None

    def forward(self, x):
        if self.gate_up_weight is not None:
            gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed experts with a Switch-style load-balancing loss.

    With top-1 routing and renormalised weights the routing weight is always exactly 1, so a router
    trained through it gets no gradient from the language-model loss (MiniMind's router only learns
    from the balancing loss). Here the renormalising sum is treated as a constant: the forward value
    is unchanged (p / sum(p) == 1 for top-1), but d(weight)/d(p) = 1 / sum(p) != 0, so the chosen
    expert's probability, and through it the router, learns from the LM loss.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        tokens = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).detach()
        weights = weights.to(x.dtype)

        # Group the N*k (token, expert) assignments by expert and run each expert on its tokens only.
        flat_choice = chosen.reshape(-1)
        order = flat_choice.argsort(stable=True)
        tokens_per_expert = torch.bincount(flat_choice, minlength=len(self.experts))
        token_of_assignment = order // self.top_k
        routed = tokens[token_of_assignment]
        # Every expert runs, on an empty batch if nothing was routed to it: its parameters then get a
        # zero gradient instead of none, which keeps DDP's gradient reduction in step across ranks.
        outputs = [expert(chunk) for expert, chunk in
                   zip(self.experts, routed.split(tokens_per_expert.tolist()))]
        weighted = torch.cat(outputs) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(tokens).index_add_(0, token_of_assignment, weighted)

        # Switch Transformer balance loss: E * sum_e (share of assignments to e) * (mean prob of e).
        # It is 1 for a perfectly uniform router and grows as routing collapses onto few experts.
        assignment_share = tokens_per_expert.float() / flat_choice.numel()
        balance_loss = len(self.experts) * (assignment_share * probs.mean(dim=0)).sum()
        return out.view(B, T, C), balance_loss


# ----------------------------------------------------------------------------------------------
# Loss: cross-entropy through the LM head, a chunk of rows at a time


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-100 = ignore), never holding
    the (N, V) logits.

    The logits are the largest tensor of a small model's training step (4096 tokens x 6400 words
    = 100 MB in fp32), and a plain cross-entropy writes and re-reads them several times (logits,
    log-softmax, its gradient, a zero-filled gradient buffer). Here each chunk of rows goes through
    the head, the log-softmax and its gradient while it is still in cache, and the gradients for
    hidden and weight are made in the forward pass (when they are needed); backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        device = hidden.device.type
        # Under autocast the head's matmuls run in the autocast dtype; the softmax in at least fp32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        exact = torch.promote_types(dtype, torch.float32)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != -100
            n_valid = valid.sum()
            # 1 / n_valid folded into the gradient rows; ignored rows get 0 (n_valid 0 gives a NaN loss
            # as F.cross_entropy does).
            row_scale = valid.to(exact) / n_valid
            safe_targets = targets.clamp(min=0)
            loss_sum = hidden.new_zeros((), dtype=exact)
            grad_hidden = torch.empty_like(h) if want_grad else None
            grad_weight = torch.zeros_like(weight, dtype=exact) if want_grad else None
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                log_probs = torch.log_softmax((h[rows] @ w.T).to(exact), dim=-1)  # (n, V)
                picked = log_probs.gather(1, safe_targets[rows, None]).squeeze(1)
                loss_sum -= (picked * valid[rows]).sum()
                if want_grad:
                    # d(mean CE)/d(logits) = (softmax - one_hot(target)) / n_valid, in place.
                    grad_logits = log_probs.exp_()
                    grad_logits[torch.arange(grad_logits.shape[0], device=h.device), safe_targets[rows]] -= 1
                    grad_logits = grad_logits.mul_(row_scale[rows, None]).to(dtype)
                    grad_hidden[rows] = grad_logits @ w
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_logits.T, h[rows])
                    else:
                        grad_weight += (grad_logits.T @ h[rows]).to(exact)
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype), None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = 512) -> torch.Tensor:
    """hidden (N, C), weight (V, C), targets (N,) -> mean next-token cross-entropy (a scalar)."""
    return ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk_rows)


# ----------------------------------------------------------------------------------------------
# Transformer block and model


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            mlp_out, balance_loss = self.mlp(h)
        else:
            mlp_out, balance_loss = self.mlp(h), None
        return x + mlp_out, balance_loss


class Backbone(nn.Module):
    """Embedding, blocks and final norm; named `model` inside NanoMind as in Hugging Face's layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V), (B, 1, V) with last_logits_only; None when targets are given
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over targets != -100
    aux_loss: torch.Tensor | None = None  # MoE balance loss, averaged over layers (not yet scaled)
    hidden_states: torch.Tensor | None = field(default=None, repr=False)  # final normed hidden (B, T, C)


class NanoMind(nn.Module):
    def __init__(self, config: ModelConfig, verbose: bool = True):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # Layers that a training step skips (LayerDrop): the trainer draws them anew for every step.
        self.skipped_layers: frozenset[int] = frozenset()
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if verbose:
            total, active = self.num_parameters(), self.num_parameters(active_only=True)
            moe = f" ({active / 1e6:.2f}M active per token)" if config.is_moe else ""
            print(f"nanomind model: {total / 1e6:.2f}M parameters{moe}")

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_parameters(self, active_only: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # parameters() counts tied weights once
        if active_only and self.config.is_moe:
            c = self.config
            per_expert = 3 * c.hidden_size * c.moe_intermediate_size
            total -= c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert
        return total

    @torch.no_grad()
    def fuse_projections(self) -> NanoMind:
        """For inference: each block's q/k/v weights, and gate/up weights, become one matrix each.

        A decoding step then runs two matrix-vector products per block where it ran five; at batch 1
        each one is a pass over its weights plus a thread fork/join, so fewer, larger ones are faster.
        The q and k norm weights are also laid out per head, so attention norms and rotates q and k
        together (see Attention.forward).
        The projection parameters become views into the fused matrices, so names, the state dict and
        memory use stay the same; the per-head norm weights are a small copy. Call it last, once the
        model has its weights, device and dtype (loading weights afterwards would not reach that copy),
        and not on a model in training; projections wrapped by LoRA adapters stay separate.
        """
        def fuse(layers: list[nn.Module]) -> torch.Tensor | None:
            if any(type(layer) is not Linear for layer in layers):
                return None
            fused = torch.cat([layer.weight for layer in layers])
            start = 0
            for layer in layers:
                rows = layer.weight.shape[0]
                layer.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
                start += rows
            return fused

        for block in self.model.layers:
            attention = block.self_attn
            attention.qkv_weight = fuse([attention.q_proj, attention.k_proj, attention.v_proj])
            if attention.qkv_weight is not None:
                attention.qk_norm_weight = torch.cat([attention.q_norm.weight.expand(attention.num_heads, -1),
                                                      attention.k_norm.weight.expand(attention.num_kv_heads, -1)])
            for mlp in block.mlp.experts if isinstance(block.mlp, MoE) else [block.mlp]:
                mlp.gate_up_weight = fuse([mlp.gate_proj, mlp.up_proj])
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        targets: torch.Tensor | None = None,  # (B, T): the token that follows each input, -100 = ignore
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, 0 = left padding
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> ModelOutput:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        context_length = cache.capacity if cache is not None else T
        positions, mask = self._positions_and_mask(B, T, past, attention_mask, input_ids.device)
        cos, sin = self.rotary(positions, context_length)

        x = self.model.embed_tokens(input_ids)
        balance_losses = []
        # Only in a training step: evaluation and generation (RL rollouts too) run every layer.
        skipped = self.skipped_layers if self.training and torch.is_grad_enabled() else ()
        for i, block in enumerate(self.model.layers):
            if i in skipped:
                continue
            x, balance_loss = block(x, cos, sin, mask, cache, i)
            if balance_loss is not None:
                balance_losses.append(balance_loss)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)

        logits = loss = None
        if targets is not None:
            loss = head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        else:
            logits = self.lm_head(x[:, -1:] if last_logits_only else x)
        aux_loss = torch.stack(balance_losses).mean() if balance_losses else None
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, hidden_states=x)

    @staticmethod
    def _positions_and_mask(B, T, past, attention_mask, device):
        """Rotary positions (B, T) and the SDPA mask (B, 1, T, S), or None for plain causal attention.

        With left padding a row's first real token gets position 0, as it would alone, and no real
        token attends to padding. Padding queries attend to themselves only, so no softmax row is
        empty (an all-masked row would produce NaNs that leak through the values of later layers).
        """
        query_index = torch.arange(past, past + T, device=device)
        if attention_mask is None:
            positions = query_index.expand(B, T)
            # SDPA's is_causal aligns the triangle top-left, which is only right without a cache prefix.
            if past == 0 or T == 1:
                return positions, None
            key_index = torch.arange(past + T, device=device)
            return positions, (key_index[None, :] <= query_index[:, None]).expand(B, 1, T, past + T)
        attention_mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        key_index = torch.arange(past + T, device=device)
        causal = key_index[None, :] <= query_index[:, None]  # (T, S)
        mask = causal[None] & attention_mask[:, None, :]  # (B, T, S)
        mask = mask | (key_index[None, None, :] == query_index[None, :, None])
        return positions, mask[:, None]
