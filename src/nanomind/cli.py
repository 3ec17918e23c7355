"""The `nanomind` command. Each subcommand's --help is its documentation.

  nanomind demo                     the whole pipeline on built-in data, tokenizer to agent RL, and a report
  nanomind tokenizer train ...      train a byte-level BPE tokenizer with MiniMind's special tokens
  nanomind generate ...             continue a prompt (or chat turn) with a checkpoint
  nanomind convert SRC --out DIR    import a Hugging Face Qwen3 / Qwen3-MoE folder or a MiniMind .pth
  nanomind prepare ...              tokenize JSONL once into memory-mapped training rows
  nanomind pretrain ...             pretrain on text (packed rows; torchrun for several processes)
  nanomind sft ...                  supervised fine-tuning on conversations
  nanomind lora ...                 train a LoRA adapter (`nanomind lora merge` folds it into the base)
  nanomind dpo ...                  direct preference optimisation on chosen/rejected pairs
  nanomind distill --teacher DIR    white-box distillation from a teacher's token distributions
  nanomind rl --algo grpo ...       reinforcement learning from rewards (GRPO, DAPO, CISPO, PPO)
  nanomind eval --model DIR --task  held-out loss, multiple choice, math/exact answers, tool use, chat
  nanomind presets                  list the model presets and their sizes
  nanomind data synth --out DIR     write the built-in bilingual curriculum (every stage, with eval sets)
  nanomind serve --model DIR        OpenAI-compatible API and web chat page (continuous batching)
  nanomind chat --model DIR         chat in the terminal
  nanomind export gguf ...          write a GGUF file (and ollama Modelfile) for llama.cpp / ollama
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                        help="torch device, e.g. cpu, cuda, cuda:1, mps (cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights dtype (None: as saved in the checkpoint)")


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_p: float,
                      per: str = "to generate") -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens {per}")
    parser.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling probability mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """Model size: a preset from model.PRESETS, with any field overridden by a flag."""
    from .model import PRESETS
    group = parser.add_argument_group("model size (a preset, each field overridable)")
    group.add_argument("--preset", choices=list(PRESETS), default=default_preset,
                       help=f"starting configuration (default: {default_preset}); see `nanomind presets`")
    group.add_argument("--hidden-size", type=int, help="width of the residual stream")
    group.add_argument("--num-layers", type=int, dest="num_hidden_layers", help="number of transformer blocks")
    group.add_argument("--num-heads", type=int, dest="num_attention_heads", help="query heads per block")
    group.add_argument("--num-kv-heads", type=int, dest="num_key_value_heads",
                       help="key/value heads (grouped-query attention; divides --num-heads)")
    group.add_argument("--head-dim", type=int, help="size of each attention head")
    group.add_argument("--intermediate-size", type=int, help="SwiGLU MLP width")
    group.add_argument("--num-experts", type=int, help="experts per MoE layer (0 = dense MLP)")
    group.add_argument("--experts-per-token", type=int, dest="num_experts_per_tok",
                       help="experts each token is routed to (top-k)")
    group.add_argument("--max-seq-len", type=int, dest="max_position_embeddings",
                       help="longest context the model supports")


def model_overrides(args: argparse.Namespace) -> dict:
    """The model-size flags the user set, to apply on top of --preset."""
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "num_experts", "num_experts_per_tok", "max_position_embeddings")
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def add_training_args(parser: argparse.ArgumentParser, default_lr: float) -> None:
    """The options every training stage shares (the loop is shared, so are its flags)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True,
                   help="a folder made by `nanomind prepare`, or raw JSONL files (prepared into OUT/prepared)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per training row (raw JSONL only)")
    g.add_argument("--val-fraction", type=float, default=0.01, help="held-out share (raw JSONL only)")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes (raw JSONL only)")
    g.add_argument("--skip-bad", action="store_true", help="skip bad lines and report them, instead of stopping")
    g = parser.add_argument_group("starting point")
    g.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint (with its tokenizer)")
    g.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (when not using --init-from)")
    add_model_args(parser)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=default_lr, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a share of --lr")
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    g.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine",
                   help="after warm-up: cosine decay, warmup-stable-decay, or constant")
    g.add_argument("--weight-decay", type=float, default=0.1, help="weight decay (matrices only)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the blocks' weight matrices, AdamW for embeddings and norms")
    g.add_argument("--layer-drop", type=float, default=0.0, metavar="P",
                   help="LayerDrop: each step skips layers with chance P (each layer on its own, or the "
                        "--layer-drop-layers together), so the model still works with them cut out by "
                        "`nanomind convert --keep-layers`")
    g.add_argument("--layer-drop-layers", type=_layer_list, default=None, metavar="I,J,...",
                   help="the layers --layer-drop skips, together (e.g. 1,2 to train the model made of "
                        "layers 0,3 too)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds; the schedule then decays by the deadline (its progress is "
                        "the share of the steps or of the budget, whichever is further)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="with torchrun: shard parameters, gradients and optimizer state over processes (FSDP2)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    g = parser.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, final model, metrics")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    g.add_argument("--sample-every", type=int, default=0, help="print greedy samples every N steps (0 = off)")
    g.add_argument("--tensorboard", action="store_true", help="also log metrics to OUT/tensorboard (pip install tensorboard)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log metrics to this wandb project (pip install wandb; WANDB_MODE=offline works offline)")
    g.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                   help="cpu, cuda, mps (with torchrun each process takes cuda:LOCAL_RANK)")
    g.add_argument("--config", type=Path, default=None,
                   help="YAML file of options (keys are flag names, - or _); flags on the command line win")


def _torch_dtype(name: str | None):
    import torch
    return getattr(torch, name) if name else None


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, e.g. 0,3; got {text!r}")


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.out, size=args.size, seed=args.seed, device=args.device)


def cmd_tokenizer_train(args):
    from .tokenizer import train_tokenizer
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.data, vocab_size=args.vocab_size, out_dir=args.out,
                                pre_tokenizer=args.pre_tokenizer, max_lines=args.max_lines)
    print(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.perf_counter() - start:.1f}s -> {args.out}")


def load_for_inference(args):
    """The --model checkpoint (with --adapter on top, unmerged) and its tokenizer."""
    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    model = load_model(args.model, device=args.device, dtype=_torch_dtype(args.dtype))
    if getattr(args, "adapter", None):
        from .lora import load_adapter
        load_adapter(model, args.adapter)
    return model.fuse_projections(), Tokenizer.load(args.tokenizer or args.model)


def sampling_params(args, **extra):
    from .generation import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, **extra)


def cmd_generate(args):
    from .generation import stream
    from .reply_parser import ReplyParser

    if (args.prompt is None) == (args.data is None):
        raise ValueError("pass either --prompt TEXT or --data PROMPTS.jsonl (with --out)")
    if args.data is not None and args.out is None:
        raise ValueError("--data needs --out FILE for the generated conversations")
    model, tokenizer = load_for_inference(args)
    params = sampling_params(args, stop=args.stop or ())
    if args.data is not None:
        from .distill import write_teacher_answers
        write_teacher_answers(model, tokenizer, args.data, args.out, params, batch_size=args.batch_size,
                              thinking=args.think, skip_bad=args.skip_bad)
        return
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, open_thinking=args.think)
    text = stream(model, tokenizer, prompt, params)
    start = time.perf_counter()
    if not args.chat:
        print(prompt, end="", flush=True)
    # A chat reply is shown as its parts: the reasoning (with --think), then the answer.
    parser = ReplyParser(args.think, parse_tools=False) if args.chat else None
    shown = None

    def show(events) -> None:
        nonlocal shown
        for kind, piece in events:
            if args.think and kind != shown:
                print(("\n\n" if shown else "") + f"[{'reasoning' if kind == 'reasoning' else 'answer'}]")
                shown = kind
            print(piece, end="", flush=True)

    for piece in text:
        show(parser.push(piece) if parser else [("text", piece)])
    if parser:
        show(parser.finish())
    elapsed = time.perf_counter() - start
    n = len(text.completion.token_ids)
    print(f"\n[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tokens/s, "
          f"finish: {text.completion.finish_reason}]", file=sys.stderr)


def cmd_convert(args):
    from .checkpoint import convert
    kind, model = convert(args.src, args.out, tokenizer_dir=args.tokenizer, dtype=_torch_dtype(args.dtype),
                          layers=args.keep_layers)
    kept = f", layers {','.join(map(str, args.keep_layers))} kept" if args.keep_layers else ""
    print(f"source: {kind}{kept}; {model.num_parameters() / 1e6:.2f}M parameters -> {args.out}")


def cmd_data_synth(args):
    from .synth import synthesize
    start = time.perf_counter()
    manifest = synthesize(args.out, size=args.size, seed=args.seed, stems=args.files)
    for name, entry in manifest["files"].items():
        print(f"{name:24} {entry['lines']:8} lines")
    print(f"wrote the {args.size} curriculum (seed {args.seed}) in {time.perf_counter() - start:.1f}s -> {args.out}")


def cmd_data_download(args):
    from .download import download
    try:
        path = download(args.name, args.out, args.repo)
    except RuntimeError as e:
        raise SystemExit(f"nanomind data download: error: {e}")
    print(f"downloaded {path}")


def cmd_prepare(args):
    from .prepare import PrepareOptions, prepare
    prepare(args.data, args.tokenizer, args.out, PrepareOptions(
        kind=args.kind, seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
        system_prompt_ratio=args.system_prompt_ratio, empty_think_removal_ratio=args.empty_think_removal_ratio,
        skip_bad=args.skip_bad), workers=args.workers)


def cmd_pretrain(args):
    from .pretrain import main as pretrain
    pretrain(args)


def cmd_sft(args):
    from .sft import main as sft
    sft(args)


def cmd_lora(args):
    from .lora import main as lora
    lora(args)


def cmd_lora_merge(args):
    from .lora import merge_main
    merge_main(args)


def cmd_dpo(args):
    from .dpo import main as dpo
    dpo(args)


def cmd_distill(args):
    from .distill import main as distill
    distill(args)


def cmd_eval(args):
    from .evaluation import main as evaluate
    evaluate(args, load=lambda folder: load_for_inference(argparse.Namespace(**{**vars(args), "model": folder})))


def cmd_rl(args):
    from .rl import main as rl
    rl(args)


def cmd_presets(args):
    from .model import NanoMind, PRESETS, preset_config
    print(f"{'preset':10} {'params':>10} {'active':>10}  hidden layers heads kv head_dim mlp experts")
    for name in PRESETS:
        c = preset_config(name)
        model = NanoMind(c, verbose=False)
        print(f"{name:10} {model.num_parameters() / 1e6:9.2f}M {model.num_parameters(True) / 1e6:9.2f}M  "
              f"{c.hidden_size:6} {c.num_hidden_layers:6} {c.num_attention_heads:5} {c.num_key_value_heads:2} "
              f"{c.head_dim:8} {c.intermediate_size:4} {c.num_experts or '-':>7}")


def cmd_serve(args):
    import os
    from .serving.server import serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("NANOMIND_API_KEY"),
          model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
          default_max_tokens=args.max_tokens, device=args.device, dtype=_torch_dtype(args.dtype),
          tokenizer_dir=args.tokenizer, adapter_dir=args.adapter)



def cmd_chat(args):
    from .chat import ChatSession, run_chat

    model, tokenizer = load_for_inference(args)
    run_chat(ChatSession(model, tokenizer, sampling_params(args), system=args.system, thinking=args.think,
                         color=sys.stdout.isatty()))


def cmd_export_gguf(args):
    from .export_gguf import export_gguf
    path = export_gguf(args.model, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_name('Modelfile')}")

# ----------------------------------------------------------------------------------------------
# Argument parsing


def build_parser() -> argparse.ArgumentParser:
    from .synth import SIZES  # neither imports torch
    from .tokenizer import PRE_TOKENIZERS

    curriculum_files = list(SIZES["tiny"].lines)
    parser = argparse.ArgumentParser(
        prog="nanomind", description="Train a small chat language model from scratch, and use it.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("demo", cmd_demo, "the whole pipeline on built-in data: tokenizer, pretraining, SFT, LoRA, DPO, "
                "distillation, GRPO, agent RL, evaluation, report card",
                "The main job: offline, on CPU, in minutes. Runs each stage with the same command a user "
                "would type (printed), into its own folder under --out; a rerun skips finished stages.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--size", choices=["test", "tiny", "small"], default="tiny",
                   help="test: about a minute, for the test suite; tiny: the default, done within 19.5 minutes (on a "
                        "slower machine every stage's time budget shrinks by the same share); small: the 26M model on "
                        "the medium curriculum, about an hour on a 2-core CPU (stages are time-boxed)")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and initialisation")
    p.add_argument("--device", default="cpu", help="cpu or cuda")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer",
                       description="Train a byte-level BPE tokenizer with MiniMind's 36 special tokens (ids 0-35) "
                                   "and the chat template. Reads JSONL (`text`, or `conversations` contents) or "
                                   "plain text, streaming. Writes tokenizer.json, tokenizer_config.json and "
                                   "chat_template.jinja, loadable by transformers.AutoTokenizer.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=cmd_tokenizer_train)
    p.add_argument("--data", nargs="+", required=True, help="JSONL or .txt files")
    p.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--max-lines", type=int, default=None, help="read at most this many lines per file")
    p.add_argument("--pre-tokenizer", choices=PRE_TOKENIZERS, default="qwen2",
                   help="how text is split before BPE: qwen2 (Qwen2/Qwen3's rule: every digit a token of its own, "
                        "so numbers are learned digit by digit) or gpt2 (GPT-2's, as MiniMind's tokenizer: "
                        "digit runs merge like words)")

    p = command("generate", cmd_generate, "continue a prompt with a checkpoint, or answer a file of prompts",
                "Stream a continuation of --prompt (or, with --chat, an assistant reply to it) and report tokens/s. "
                "With --data PROMPTS.jsonl --out SFT.jsonl, answer every conversation of the file in batches "
                "and write them in MiniMind's SFT format (black-box distillation: `nanomind sft` trains on it).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompt", default=None, help="text to continue, or the user message with --chat")
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of conversations (SFT or RL-prompt format) to answer; a trailing assistant turn "
                        "is replaced by the model's answer")
    p.add_argument("--out", type=Path, default=None, help="with --data: the SFT JSONL to write")
    p.add_argument("--batch-size", type=int, default=16, help="with --data: prompts decoded together")
    p.add_argument("--skip-bad", action="store_true", help="with --data: skip bad lines and report them")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--think", action="store_true", help="let the model write its reasoning first (with --chat)")
    add_sampling_args(p, max_new_tokens=128, temperature=0.0, top_p=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_device_args(p)

    p = command("convert", cmd_convert, "import a Hugging Face Qwen3/Qwen3-MoE folder or a MiniMind .pth",
                "Detects the source kind and writes a nanomind checkpoint (also a native transformers Qwen3 "
                "folder). Loading is strict: mismatched tensors are an error.")
    p.add_argument("src", type=Path, help="Hugging Face model directory, or MiniMind .pth state dict")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (required for a .pth; default for a folder: the folder itself)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="save weights in this dtype (default: as in the source)")
    p.add_argument("--keep-layers", type=_layer_list, default=None, metavar="I,J,...",
                   help="keep only these decoder layers, in this order (depth pruning), e.g. 0,3 of a 4-layer "
                        "model: a smaller student that starts from its teacher's weights, for `nanomind "
                        "distill --init-from`")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("synth", help="write the built-in bilingual curriculum for every training stage",
                        description="Write a deterministic Chinese/English curriculum in MiniMind's JSONL formats: "
                                    "pretrain, sft, dpo, rl, agent_rl and lora_domain files, a held-out eval_* file "
                                    "for each, and manifest.json (line counts, sha256). The same seed gives "
                                    "byte-identical files.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=cmd_data_synth)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="small",
                   help="tiny: ~2.5K lines for tests; small: the CPU demo; medium: ~10x small")
    p.add_argument("--seed", type=int, default=0, help="seed for the invented world and every file")
    p.add_argument("--files", nargs="+", default=None, metavar="NAME",
                   help="write only these files (and their eval_ files), by name without .jsonl: "
                        f"{', '.join(curriculum_files)}; default all")

    p = data.add_parser("download", help="fetch one of MiniMind's dataset files from the Hugging Face hub",
                        description="Download a MiniMind dataset file by name (resumable) with huggingface_hub. "
                                    "Needs network access; fails with a clear message without it.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=cmd_data_download)
    p.add_argument("name", help="file name, e.g. pretrain_t2t_mini.jsonl, sft_t2t_mini.jsonl, dpo.jsonl, rlaif.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--repo", default="jingyaogong/minimind_dataset", help="Hugging Face dataset repository")

    p = command("prepare", cmd_prepare, "tokenize JSONL once into memory-mapped training rows",
                "Validate and tokenize MiniMind-format JSONL (pretrain, sft, dpo, rl, agent) into a folder of "
                "memory-mapped token arrays with a manifest. Pretraining documents are packed without padding; "
                "SFT conversations are packed several per row with an assistant-only loss mask.")
    p.add_argument("--kind", choices=["pretrain", "sft", "dpo", "rl", "agent"], required=True, help="data format")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder (or a checkpoint)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training row")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of lines held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and the augmentations")
    p.add_argument("--skip-bad", action="store_true", help="skip bad lines and report them, instead of stopping")
    p.add_argument("--system-prompt-ratio", type=float, default=0.0,
                   help="sft: share of samples given a random system prompt")
    p.add_argument("--empty-think-removal-ratio", type=float, default=0.0,
                   help="sft: share of samples whose empty <think></think> blocks are removed")

    p = command("pretrain", cmd_pretrain, "pretrain a model on text (next-token prediction, packed rows)",
                "Pretrain from scratch (a --preset) or continue a checkpoint (--init-from). Works under "
                "`torchrun --nproc_per_node N -m nanomind pretrain ...` unchanged.")
    add_training_args(p, default_lr=1e-3)
    p = command("sft", cmd_sft, "supervised fine-tuning on conversations (loss on assistant turns only)",
                "Fine-tune a checkpoint (--init-from) on MiniMind-format conversations, with reasoning and "
                "tool calls. Works under torchrun unchanged.")
    add_training_args(p, default_lr=5e-4)

    p = command("lora", cmd_lora, "train a LoRA adapter on conversations (the base model stays frozen)",
                "Add low-rank adapters to the --target-modules of --init-from and train only them, on SFT data. "
                "Writes OUT/adapter in PEFT's layout (peft.PeftModel.from_pretrained loads it). Use it with "
                "`generate/chat/serve --adapter`, or fold it in with `nanomind lora merge`.")
    add_training_args(p, default_lr=1e-3)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="adapter rank r")
    g.add_argument("--alpha", type=float, default=16.0, help="scale: the update is (alpha / rank) * B @ A")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated names of the linear layers that get adapters (MoE experts included)")
    p = command("lora-merge", cmd_lora_merge, "fold a LoRA adapter into its base: a full checkpoint "
                "(also typed `nanomind lora merge`)")
    p.prog = "nanomind lora merge"
    p.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder (from `nanomind lora`)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="save weights in this dtype (default: the base's)")

    p = command("dpo", cmd_dpo, "direct preference optimisation on chosen/rejected conversation pairs",
                "Train --init-from to prefer `chosen` over `rejected` against a frozen copy of itself (the "
                "reference). Log-probabilities are summed over the assistant tokens. Works under torchrun.")
    add_training_args(p, default_lr=1e-6)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    g.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid",
                   help="sigmoid: standard DPO; ipo: squared distance to 1/(2 beta); hinge: max(0, 1 - beta * margin)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="sigmoid loss: assumed share of flipped preference labels (conservative DPO)")
    g.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="weight of an added SFT loss on the chosen answers (0 = off)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="score the reference once before training and cache it in OUT (no reference in memory)")

    p = command("distill", cmd_distill, "white-box distillation: match a teacher's next-token distributions",
                "Train the student (--init-from, or a --preset) on conversations with "
                "alpha * CE + (1 - alpha) * T^2 * KL(teacher, student) on the assistant tokens. Teacher and "
                "student must share the tokenizer; the teacher may be larger, dense or MoE.")
    add_training_args(p, default_lr=5e-4)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint directory")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the cross-entropy on the data (1 - alpha: KL)")
    g.add_argument("--temperature", type=float, default=1.0, help="softens both distributions in the KL term")
    g.add_argument("--kl", choices=["forward", "reverse"], default="forward",
                   help="forward: KL(teacher || student), mass-covering; reverse: KL(student || teacher), mode-seeking")

    p = command("rl", cmd_rl, "reinforcement learning from rewards: GRPO, DAPO, CISPO or PPO",
                "Sample --num-generations completions of each RL prompt with --init-from, score them with the "
                "--reward functions, and improve the model on them over several clipped passes per rollout. "
                "--batch-size is prompts per process per rollout; each of --ppo-epochs x --minibatches "
                "minibatches is one optimizer step. Unset algorithm options take the --algo's defaults. "
                "Works under torchrun.")
    add_training_args(p, default_lr=1e-6)
    g = p.add_argument_group("RL")
    g.add_argument("--algo", choices=["grpo", "dapo", "cispo", "ppo"], default="grpo",
                   help="grpo: group-normalised advantages, clipped ratio; dapo: clip-higher, dynamic sampling, "
                        "token-level loss, overlong penalty; cispo: clipped stop-gradient weight on log pi; "
                        "ppo: value model, GAE, KL penalty in the reward")
    g.add_argument("--reward", action="append", metavar="NAME[=WEIGHT]",
                   help="a reward and its weight (repeatable): math, exact, think_format, tool_calls, length, "
                        "repetition, or FILE.py:FUNCTION; unset: math")
    g.add_argument("--reward-model", type=Path, default=None, help="a reward model folder scoring the answers")
    g.add_argument("--num-generations", type=int, help="completions per prompt, G; unset: 8 (ppo: 1)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest completion")
    g.add_argument("--max-prompt-len", type=int, default=512, help="longer prompts (templated) are skipped")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (> 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="rollout top-k sampling (0 = off)")
    g.add_argument("--thinking-ratio", type=float, default=0.0,
                   help="share of prompts rendered with an open <think> block")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    g.add_argument("--minibatches", type=int, default=2, help="minibatches (optimizer steps) per pass")
    g.add_argument("--clip-low", type=float, help="ratio clip below 1; unset: 0.2 (cispo: 1.0, no lower bound)")
    g.add_argument("--clip-high", type=float, help="ratio clip above 1; unset: 0.2 (dapo: 0.28, cispo: 4.0)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="weight of the k3 KL to a frozen reference in the loss (grpo, dapo, cispo; 0: no reference)")
    g.add_argument("--loss-agg", choices=["token", "sequence"],
                   help="average over all tokens, or per sequence first; unset: sequence for grpo, else token")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="replace groups with all-equal rewards by fresh prompts; unset: on for dapo only")
    g.add_argument("--max-resample", type=int, default=3, help="dynamic sampling: extra generation rounds")
    g.add_argument("--overlong-buffer", type=int,
                   help="penalise completions in the last N tokens before --max-new-tokens; unset: "
                        "max-new-tokens/4 for dapo, else 0")
    g.add_argument("--agent", action="store_true",
                   help="multi-turn tool rollouts on agent data (raw JSONL is prepared as agent data; a folder "
                        "prepared with --kind agent needs no flag)")
    g.add_argument("--max-turns", type=int, default=3, help="agent: most model replies per trajectory")
    g.add_argument("--max-total-len", type=int, default=None,
                   help="agent: longest trajectory in tokens; unset: 1024 (or the model's context if shorter)")
    g.add_argument("--tools", default=None,
                   help="agent: a Python file of tool functions, or `world` (world:SEED for a curriculum made with "
                        "another --seed) for the built-in ones plus lookups in the built-in curriculum's world "
                        "(default: the built-in calculator and unit converter)")
    g.add_argument("--critic", choices=["separate", "shared"], default="separate",
                   help="ppo value model: a copy of the policy with a value head, or a head on the policy itself")
    g.add_argument("--gamma", type=float, default=1.0, help="ppo: discount")
    g.add_argument("--lam", type=float, default=0.95, help="ppo: GAE lambda")
    g.add_argument("--vf-coef", type=float, default=0.5, help="ppo: weight of the value loss")
    g.add_argument("--value-clip", type=float, default=0.2, help="ppo: clip of the value change per rollout")
    g.add_argument("--kl-coef", type=float,
                   help="ppo: KL penalty in the per-token reward (0: no reference); unset: 0.02")

    p = command("eval", cmd_eval, "measure a checkpoint: held-out loss, multiple choice, answers, tool use, chat",
                "Tasks: loss (loss, perplexity, bits per byte on pretrain text or SFT conversations); choice "
                "(multiple choice on C-Eval / CMMLU / MMLU style CSV or JSONL, by the length-normalised "
                "log-likelihood of each option's text, or of its letter with --choice-scoring letter; per subject); "
                "math / exact (answers generated for RL prompts, checked against their gt); tools (multi-turn "
                "tool use on agent records: right tools, valid arguments, call count, final answer, per case); "
                "chat (fixed prompts answered side by side by each --model). Prints a summary; --out saves JSON.")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="checkpoint directory (repeat it to compare several with --task chat)")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--task", choices=["loss", "choice", "math", "exact", "tools", "chat"], required=True,
                   help="what to measure")
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="input files: loss: pretrain/SFT JSONL; choice: CSV/JSONL files or folders of them; math, "
                        "exact: RL JSONL with gt; tools: agent JSONL; chat: .txt (a prompt per line) or "
                        "conversation JSONL (default: a built-in Chinese and English set)")
    p.add_argument("--out", type=Path, default=None, help="write the results (and per-case details) as JSON here")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate at most N questions / prompts / cases (loss: rows of --seq-len tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences scored or decoded together")
    p.add_argument("--shots", type=int, default=0, help="choice: answered examples of the same subject before each")
    p.add_argument("--choice-scoring", choices=["text", "letter"], default="text",
                   help="choice: score each option's text (per byte) or its letter after the listed options")
    p.add_argument("--seq-len", type=int, default=512, help="loss: tokens per scored row")
    p.add_argument("--tools", default=None,
                   help="tools: a Python file of tool functions, or `world` (world:SEED for a curriculum made with "
                        "another --seed) for the built-in ones plus lookups in the built-in curriculum's world "
                        "(default: the built-in calculator and unit converter)")
    p.add_argument("--max-turns", type=int, default=3, help="tools: most model replies per case")
    p.add_argument("--think", action="store_true", help="open a <think> block for the model's reasoning first")
    p.add_argument("--skip-bad", action="store_true", help="skip bad JSONL lines and report them, instead of stopping")
    add_sampling_args(p, max_new_tokens=256, temperature=0.0, top_p=1.0, per="per reply")
    add_device_args(p)

    command("presets", cmd_presets, "list the model presets and their parameter counts")

    p = command("serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page",
                "FastAPI server: POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models, "
                "GET /health, and a chat page at /. One engine thread decodes all requests together "
                "(continuous batching).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8998, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOMIND_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch slot; more are refused with 429")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="reply length limit when a request sets no max_tokens")
    add_device_args(p)

    p = command("chat", cmd_chat, "chat with a checkpoint in the terminal",
                "Streamed replies with the conversation kept. Commands: /reset, /think (toggle reasoning), "
                "/system TEXT, /exit. End a line with \\ (or wrap lines in \"\"\") for a multi-line message. "
                "Ctrl-C stops the reply being written, not the program.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="start with thinking on (toggle with /think)")
    add_sampling_args(p, max_new_tokens=512, temperature=0.7, top_p=0.9, per="per reply")
    add_device_args(p)

    export = sub.add_parser("export", help="export a checkpoint to other formats").add_subparsers(
        dest="action", required=True)
    p = export.add_parser("gguf", help="write a GGUF file for llama.cpp / ollama",
                          description="Write the checkpoint as a GGUF file (Qwen3 architecture, with the byte-level "
                                      "BPE tokenizer and the chat template) that llama.cpp loads, and an ollama "
                                      "Modelfile next to it.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=cmd_export_gguf)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--out", type=Path, required=True, help="output .gguf file")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                   help="tensor type of the weight matrices (norms always stay f32)")
    return parser


def expand_config_file(argv: list[str]) -> list[str]:
    """Replace `--config run.yaml` by the flags it holds, placed right after the command words so
    that flags typed on the command line come later and win."""
    if "--config" not in argv:
        return argv
    import yaml

    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise SystemExit("nanomind: error: --config needs a YAML file")
    path = Path(argv[at + 1])
    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"nanomind: error: cannot read --config {path}: {e}")
    if not isinstance(options, dict):
        raise SystemExit(f"nanomind: error: {path} must hold a mapping of option names to values")
    rest = argv[:at] + argv[at + 2:]
    commands = 0
    while commands < len(rest) and not rest[commands].startswith("-"):
        commands += 1
    flags = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return rest[:commands] + flags + rest[commands:]


def main(argv: list[str] | None = None) -> None:
    argv = expand_config_file(list(sys.argv[1:] if argv is None else argv))
    if argv[:2] == ["lora", "merge"]:
        argv = ["lora-merge", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError) as e:
        # Errors about the user's input: the message says what and where; a traceback would not help.
        print(f"nanomind {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
