"""Checkpoints: a directory that Hugging Face transformers loads as a native Qwen3 / Qwen3-MoE model.

Layout: `config.json` (Qwen3Config fields), `model.safetensors`, `generation_config.json` and the
tokenizer files. Loading is strict (every tensor present, none extra, shapes equal) and saving is
atomic (everything is written to a temporary directory that is renamed into place at the end).

Also here: importing other formats (`convert`): a Hugging Face Qwen3 / Qwen3-MoE directory, or a
MiniMind `.pth` state dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ModelConfig, NanoMind


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json transformers reads: Qwen3 (dense) or Qwen3-MoE, no custom code."""
    c = config
    hf = {
        "architectures": ["Qwen3MoeForCausalLM" if c.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if c.is_moe else "qwen3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "use_cache": True,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # transformers < 5 reads rope_theta / rope_scaling, transformers >= 5 reads rope_parameters.
        "rope_theta": c.rope_theta,
        "rope_scaling": _yarn_parameters(c),
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}
        if not c.rope_scaling else {**_yarn_parameters(c), "rope_theta": c.rope_theta},
    }
    if c.is_moe:
        hf.update(
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            router_aux_loss_coef=c.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    return hf


def _yarn_parameters(c: ModelConfig) -> dict | None:
    if not c.rope_scaling:
        return None
    s = dict(c.rope_scaling)
    s.pop("type", None)
    s["rope_type"] = "yarn"
    return s


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not qwen3 or qwen3_moe")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: sliding-window attention is not supported")
    rope = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "yarn" else None)
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind != "yarn":
            raise CheckpointError(f"{source}: rope scaling {kind!r} is not supported (only yarn)")
        rope_scaling = {k: v for k, v in rope_scaling.items() if k not in ("rope_type", "type", "rope_theta")}
        rope_scaling = {"type": "yarn", **rope_scaling}
    is_moe = model_type == "qwen3_moe"
    if is_moe and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        raise CheckpointError(f"{source}: MoE models with dense layers in between are not supported")
    eos = hf.get("eos_token_id", 2)
    known = {f.name for f in fields(ModelConfig)}
    values = {k: v for k, v in hf.items() if k in known}
    values.update(
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 1e6)),
        rope_scaling=rope_scaling,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        # transformers >= 5 writes num_local_experts, earlier versions and the hub num_experts.
        num_experts=hf.get("num_experts", hf.get("num_local_experts", 0)) if is_moe else 0,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    return ModelConfig(**values)


# ----------------------------------------------------------------------------------------------
# Saving


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path):
    """Yield an empty temporary folder next to `out_dir`; when the block succeeds it replaces `out_dir`
    in one rename, when it fails it is removed: readers see the old folder or the new one, never half."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: NanoMind, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                    write_extra: Callable[[Path], None] | None = None, state_dict: dict | None = None) -> Path:
    """Write a transformers-loadable checkpoint directory atomically (temp dir, then rename).

    `write_extra(folder)` may add files (e.g. a trainer's resume state) before the rename, so they
    appear together with the weights or not at all. `state_dict` replaces the model's own (a sharded
    model passes its gathered, full weights)."""
    dtype = dtype or next(model.parameters()).dtype
    with atomic_directory(out_dir) as tmp:
        weights = state_dict if state_dict is not None else model.state_dict()
        tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in weights.items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # the loader re-ties it to the embedding
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_to_hf(model.config, dtype))
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": [model.config.eos_token_id],
            "pad_token_id": model.config.pad_token_id,
            "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
        })
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
    return Path(out_dir)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is only deleted once the new one is in place."""
    for f in new.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# ----------------------------------------------------------------------------------------------
# Loading


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: `model.safetensors` or the shards an index file lists."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing weights file")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_state_dict_strict(model: NanoMind, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model; any missing, unexpected or mis-shaped tensor is an error."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    problems = []
    for name in sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing tensor {name} (expected shape {tuple(expected[name].shape)})")
    for name in sorted(tensors.keys() - expected.keys()):
        problems.append(f"unexpected tensor {name} (shape {tuple(tensors[name].shape)})")
    for name in sorted(expected.keys() & tensors.keys()):
        if tensors[name].shape != expected[name].shape:
            problems.append(f"tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"the model expects {tuple(expected[name].shape)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source}: weights do not match the model config:\n  {shown}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, verbose: bool = False) -> NanoMind:
    """Load a nanomind / Hugging Face Qwen3 checkpoint directory into a NanoMind model (strict)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no config.json)")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    tensors = unpack_fused_experts(read_safetensors(directory), config)
    model = NanoMind(config, verbose=verbose)
    load_state_dict_strict(model, tensors, str(directory))
    saved_dtype = next(iter(tensors.values())).dtype
    return model.to(device=device, dtype=dtype or saved_dtype).eval()


def unpack_fused_experts(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers >= 5 may save MoE experts fused as `experts.gate_up_proj` (E, 2I, C) and
    `experts.down_proj` (E, C, I); split them into the per-expert names of the hub format."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(t.chunk(2, dim=1) for t in t.unbind(0)):
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(t.unbind(0)):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = t
    return out


# ----------------------------------------------------------------------------------------------
# Importing other formats


def config_from_minimind_state_dict(tensors: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """MiniMind's .pth holds no config: read the dimensions off the tensor shapes."""
    try:
        vocab_size, hidden = tensors["model.embed_tokens.weight"].shape
        head_dim = tensors["model.layers.0.self_attn.q_norm.weight"].shape[0]
        num_heads = tensors["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim
        num_kv_heads = tensors["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim
    except KeyError as e:
        raise CheckpointError(f"{source}: not a MiniMind state dict (no tensor {e.args[0]})") from None
    num_layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    num_experts = len({k.split(".")[5] for k in tensors if k.startswith("model.layers.0.mlp.experts.")})
    if num_experts:
        moe_intermediate = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
        intermediate = moe_intermediate
    else:
        intermediate = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
        moe_intermediate = intermediate
    tied = "lm_head.weight" not in tensors or torch.equal(tensors["lm_head.weight"],
                                                          tensors["model.embed_tokens.weight"])
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, num_experts=num_experts, moe_intermediate_size=moe_intermediate,
        tie_word_embeddings=tied)


def detect_source_kind(src: Path) -> str:
    if src.is_dir() and (src / "config.json").exists():
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
        if model_type in ("qwen3", "qwen3_moe"):
            return "huggingface-qwen3-moe" if model_type == "qwen3_moe" else "huggingface-qwen3"
        raise CheckpointError(f"{src}: config.json has model_type {model_type!r}; only qwen3 and "
                              "qwen3_moe directories can be imported")
    if src.is_file() and src.suffix in (".pth", ".pt", ".bin"):
        return "minimind-pth"
    raise CheckpointError(f"{src}: neither a Hugging Face Qwen3 directory (with config.json) nor a "
                          "MiniMind .pth state dict")


def keep_layers(model: NanoMind, layers: list[int]) -> NanoMind:
    """The model with only the given decoder layers, in the given order (depth pruning).

    A student made this way starts from its teacher's embedding, layers and head, so it knows much of
    what the teacher knows before it trains a step; the first and last layers matter most, as the
    pruning literature finds (Gromov et al. 2024; Minitron, Muralidharan et al. 2024).
    """
    total = model.config.num_hidden_layers
    if not layers:
        raise CheckpointError("--keep-layers needs at least one layer")
    if bad := [i for i in layers if not 0 <= i < total]:
        raise CheckpointError(f"--keep-layers {','.join(map(str, bad))}: the model has layers 0..{total - 1}")
    if len(set(layers)) != len(layers):
        raise CheckpointError(f"--keep-layers {','.join(map(str, layers))} names a layer twice")
    pruned = NanoMind(replace(model.config, num_hidden_layers=len(layers)), verbose=False)
    pruned.to(next(model.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers."):
            tensors[name] = tensor
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if int(layer) in new_index:
            tensors[f"model.layers.{new_index[int(layer)]}.{rest}"] = tensor
    load_state_dict_strict(pruned, tensors, "the kept layers")
    return pruned


def convert(src: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            dtype: torch.dtype | None = None, layers: list[int] | None = None) -> tuple[str, NanoMind]:
    """Import a checkpoint into nanomind's format, optionally keeping only some of its decoder layers;
    returns the detected source kind and the model."""
    from .tokenizer import Tokenizer

    src = Path(src)
    kind = detect_source_kind(src)
    if kind.startswith("huggingface"):
        model = load_model(src, dtype=dtype)
        tokenizer_dir = tokenizer_dir or (src if (src / "tokenizer.json").exists() else None)
    else:
        tensors = torch.load(src, map_location="cpu", weights_only=True)
        tensors = tensors.get("model", tensors) if isinstance(tensors, dict) else tensors
        tensors = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensors.items()
                   if not k.endswith(("freqs_cos", "freqs_sin"))}
        config = config_from_minimind_state_dict(tensors, str(src))
        model = NanoMind(config, verbose=False)
        load_state_dict_strict(model, tensors, str(src))
        if dtype:
            model = model.to(dtype)
        if tokenizer_dir is None:
            raise CheckpointError(f"{src}: a MiniMind .pth holds no tokenizer; pass --tokenizer DIR "
                                  "(the folder with MiniMind's tokenizer.json)")
    if layers is not None:
        model = keep_layers(model, layers)
    tokenizer = Tokenizer.load(tokenizer_dir) if tokenizer_dir else None
    save_checkpoint(model, out_dir, tokenizer=tokenizer, dtype=dtype or next(model.parameters()).dtype)
    return kind, model
