"""LoRA: fine-tune a frozen model through small low-rank updates of its linear layers.

Each targeted linear layer W becomes  y = W x + (alpha / r) * B A dropout(x),  with A (r x in) and
B (out x r). B starts at zero, so training starts exactly from the base model, and only A and B
reach the optimizer. The adapter is saved in PEFT's layout (`adapter_config.json` and
`adapter_model.safetensors` with PEFT's tensor names), so `peft.PeftModel.from_pretrained` loads it
on the transformers model of the same base.

  nanomind lora --init-from runs/sft/model --data lora_domain.jsonl --out runs/lora
  nanomind chat --model runs/sft/model --adapter runs/lora/adapter
  nanomind lora merge --model runs/sft/model --adapter runs/lora/adapter --out runs/lora/merged
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, atomic_directory, load_model, save_checkpoint
from .trainer import Stage, TrainingError, run_stage, token_loss

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped transformers model
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAMPLE_PROMPTS = ["What is 3 plus 4?", "你好，你是谁？"]


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def to_peft(self, base_model: str | None) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(self.target_modules), "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "base_model_name_or_path": base_model}

    @classmethod
    def from_peft(cls, config: dict, source: str) -> LoRAConfig:
        unsupported = {key: config.get(key) for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                                                         "modules_to_save", "layers_to_transform") if config.get(key)}
        if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or unsupported:
            raise CheckpointError(f"{source}: only plain LoRA adapters (no bias, DoRA, rsLoRA, per-layer "
                                  f"patterns or extra modules) are supported; found {unsupported or config.get('peft_type')}")
        targets = config["target_modules"]
        return cls(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                   target_modules=tuple([targets] if isinstance(targets, str) else targets))


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update; the parameter names are PEFT's."""

    def __init__(self, base_layer: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, config.rank, bias=False, **factory)
        self.lora_B = nn.Linear(config.rank, base_layer.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(config.dropout)
        self.scaling = config.alpha / config.rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            update = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            self.base_layer.weight += update.to(self.base_layer.weight.dtype)
        return self.base_layer


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap every linear layer named in `config.target_modules` (MoE experts too).
    Returns the wrapped layers' names."""
    model.requires_grad_(False)
    targets = set(config.target_modules)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and name != "lm_head"]
    if not chosen:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TrainingError(f"no linear layer is named {sorted(targets)}; the model has {names}")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, config))
    return [name for name, _ in chosen]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer, in place: a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# Adapter files (PEFT's layout)


def save_adapter(folder: str | Path, config: LoRAConfig, weights: dict[str, torch.Tensor],
                 base_model: str | None = None, write_extra=None) -> Path:
    """Write the adapter tensors found in `weights` (a state dict of a model with adapters), atomically."""
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in weights.items() if ".lora_A." in name or ".lora_B." in name}
    with atomic_directory(folder) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft(base_model), indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
    return Path(folder)


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The adapter's config and its tensors under the model's own parameter names."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: not a LoRA adapter folder (no {name})")
    config = LoRAConfig.from_peft(json.loads((folder / ADAPTER_CONFIG).read_text()), str(folder / ADAPTER_CONFIG))
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
        tensors = {key.removeprefix(PEFT_PREFIX): f.get_tensor(key) for key in f.keys()}
    return config, tensors


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapter in `folder` on `model` (unmerged, in eval mode). Every adapter tensor must
    find its place and shape, and every adapter place must get a tensor."""
    config, tensors = read_adapter(folder)
    add_lora(model, config)
    expected = {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    wrong = [n for n in expected.keys() & tensors.keys() if expected[n].shape != tensors[n].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{folder}: the adapter does not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(wrong)[:3]})")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Commands


def main(args) -> dict:
    if args.init_from is None:
        raise TrainingError("LoRA adapts an existing model: pass --init-from CHECKPOINT")
    if args.fsdp:
        raise TrainingError("LoRA trains under plain DDP (the adapters are small); drop --fsdp")
    config = LoRAConfig(args.rank, args.alpha, args.lora_dropout,
                        tuple(t.strip() for t in args.target_modules.split(",") if t.strip()))
    base = str(Path(args.init_from).resolve())

    def make_stage(inputs) -> Stage:
        wrapped = add_lora(inputs.model, config)
        trainable, total = count_parameters(inputs.model)
        if inputs.run.is_main:
            print(f"LoRA r={config.rank} alpha={config.alpha:g} on {len(wrapped)} layers: {trainable:,} trainable "
                  f"parameters ({100 * trainable / total:.2f}% of {total:,})")
        return Stage("lora", inputs.train_rows, inputs.val_rows, token_loss, sample_prompts=SAMPLE_PROMPTS,
                     chat_samples=True, output_name="adapter",
                     save_fn=lambda model, folder, tokenizer, weights, write_extra=None:
                         save_adapter(folder, config, weights, base, write_extra),
                     load_fn=lambda model, folder: read_adapter(folder)[1])

    return run_stage(args, "sft", make_stage)


def merge_main(args) -> None:
    from .tokenizer import Tokenizer

    model = load_model(args.model)  # in the dtype it was saved in, which the merged model keeps by default
    merge_lora(load_adapter(model, args.adapter))
    save_checkpoint(model, args.out, tokenizer=Tokenizer.load(args.model),
                    dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged {args.adapter} into {args.model} -> {args.out}")
