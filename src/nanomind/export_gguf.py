"""Export a checkpoint as GGUF for llama.cpp and ollama: `nanomind export gguf --model DIR --out FILE`.

The file is written with the `gguf` package's GGUFWriter as llama.cpp's `qwen3` architecture (or
`qwen3moe` for MoE checkpoints), which is exactly what nanomind's model is:

  hyper-parameters  qwen3.block_count, .context_length, .embedding_length, .feed_forward_length,
                    .attention.head_count(_kv), .attention.key_length / value_length (head_dim),
                    .rope.freq_base, .attention.layer_norm_rms_epsilon (+ expert_* for MoE, YaRN scaling)
  tensors           token_embd, output_norm, output (only when untied), blk.N.attn_norm, attn_q/k/v,
                    attn_q_norm, attn_k_norm, attn_output, ffn_norm, ffn_gate/up/down
                    (MoE: ffn_gate_inp and the experts stacked as ffn_gate_exps/up_exps/down_exps)
  tokenizer         tokenizer.ggml.model "gpt2" (byte-level BPE), .pre "qwen2" or "gpt-2" (the tokenizer's
                    splitting rule, by llama.cpp's name), the vocabulary in id order, the merges, token types (control for the
                    special ids, user-defined for the other added tokens), bos/eos/pad ids, chat template

Qwen3 uses rotate-half rotary embeddings, which llama.cpp runs natively for this architecture, so the
q/k weights are written unchanged (no permutation as for LLaMA). Norm weights stay f32; the matrices
are f32, f16 or q8_0 (a matrix whose rows are not a multiple of 32 stays f16 with q8_0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .model import NanoMind
from .tokenizer import FIRST_NON_SPECIAL_ID, Tokenizer

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # llama.cpp's llama_token_type values

LAYER_TENSORS = {  # nanomind name inside model.layers.N -> GGUF name inside blk.N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # MoE router
}
EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                  "down_proj": "ffn_down_exps.weight"}


def gguf_tensors(model: NanoMind) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names (experts stacked into one (E, out, in) tensor each)."""
    c = model.config
    state = model.state_dict()
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for name, gguf_name in LAYER_TENSORS.items():
            if prefix + name in state:
                out[f"blk.{i}.{gguf_name}"] = state[prefix + name]
        if c.is_moe:
            for proj, gguf_name in EXPERT_TENSORS.items():
                out[f"blk.{i}.{gguf_name}"] = torch.stack(
                    [state[f"{prefix}mlp.experts.{e}.{proj}.weight"] for e in range(c.num_experts)])
    return out


def gguf_pre_tokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the tokenizer's splitting rule; llama.cpp picks the
    regex by that name, so a rule it has no name for cannot be exported faithfully."""
    name = tokenizer.pre_tokenizer_name
    if name is None:
        raise ValueError("this tokenizer splits text with a rule llama.cpp has no name for (neither Qwen2's nor "
                         "GPT-2's): a GGUF file would tokenize differently; retrain it with `nanomind tokenizer train`")
    return {"qwen2": "qwen2", "gpt2": "gpt-2"}[name]


def tokenizer_metadata(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their llama.cpp types, and the BPE merges as 'left right' strings."""
    data = json.loads(tokenizer.hf_tokenizer.to_str())
    added = {t["id"]: t for t in data["added_tokens"]}
    vocab = {i: piece for piece, i in data["model"]["vocab"].items()}
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TOKEN_CONTROL if added[i]["special"] and i < FIRST_NON_SPECIAL_ID else TOKEN_USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def ollama_modelfile(gguf_name: str) -> str:
    """An ollama Modelfile: the GGUF, nanomind's chat layout as a Go template, and the stop token."""
    return f'''# ollama create nanomind -f Modelfile && ollama run nanomind
FROM ./{gguf_name}
TEMPLATE """{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ if eq .Role "assistant" }}}}<think>

</think>

{{{{ end }}}}{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
<think>

</think>

"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
PARAMETER temperature 0.7
PARAMETER top_p 0.9
'''


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f16",
                tokenizer_dir: str | Path | None = None) -> Path:
    import gguf

    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"dtype must be f32, f16 or q8_0, got {dtype!r}")
    model = load_model(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.load(tokenizer_dir or model_dir)
    c = model.config
    if tokenizer.vocab_size != c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{c.vocab_size}; llama.cpp needs one entry per embedding row")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = "qwen3moe" if c.is_moe else "qwen3"
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(Path(model_dir).resolve().name)
    writer.add_file_type(file_type)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(c.rope_scaling["original_max_position_embeddings"])
    if c.is_moe:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_weights_norm(c.norm_topk_prob)

    tokens, types, merges = tokenizer_metadata(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    for name, tensor in gguf_tensors(model).items():
        array = tensor.detach().cpu().float().numpy()
        if array.ndim == 1 or dtype == "f32":
            writer.add_tensor(name, array.astype(np.float32))
        elif dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_name("Modelfile").write_text(ollama_modelfile(out.name), encoding="utf-8")
    return out
