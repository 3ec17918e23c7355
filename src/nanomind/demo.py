"""The main job, first version: train a tokenizer and a tiny model on built-in text, then sample.

Everything runs offline on a CPU in about a minute:
  1. write the built-in bilingual corpus to DIR/data/builtin.jsonl
  2. train a byte-level BPE tokenizer on it            -> DIR/tokenizer
  3. pack the tokenized documents into fixed-length rows (no padding) and pretrain the `tiny`
     preset for a fixed wall-clock budget               -> DIR/model (a transformers-loadable checkpoint)
  4. sample continuations of a few prompts

The data pipeline and the shared training loop (pretrain, SFT, DDP, resume) replace step 3 later;
this keeps the first run honest and short.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .builtin_text import write_builtin_jsonl
from .checkpoint import save_checkpoint
from .generation import SamplingParams, generate
from .model import NanoMind, preset_config
from .tokenizer import train_tokenizer

DEMO_PROMPTS = ["3 plus 4 equals", "The colour of grass is", "小明和小狗去了", "A week has"]


def pack_documents(documents: list[list[int]], separator: int, seq_len: int) -> torch.Tensor:
    """Join documents with the end-of-text token and cut the stream into rows of seq_len + 1 tokens
    (inputs are a row's first seq_len tokens, targets its last seq_len); the ragged tail is dropped."""
    stream = [t for doc in documents for t in (*doc, separator)]
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"only {len(stream)} tokens of text: not enough for one row of {seq_len + 1}")
    return torch.tensor(stream[: rows * (seq_len + 1)]).view(rows, seq_len + 1)


def pretrain_for(model: NanoMind, rows: torch.Tensor, seconds: float, batch_size: int,
                 lr: float, log_every: float = 10.0) -> list[float]:
    """AdamW with linear warm-up and cosine decay over a wall-clock budget; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses, start, last_log, step = [], time.perf_counter(), 0.0, 0
    while (elapsed := time.perf_counter() - start) < seconds:
        progress = elapsed / seconds
        scale = min(1.0, progress / 0.05) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if elapsed - last_log >= log_every or step == 1:
            print(f"  step {step:5d}  {elapsed:5.1f}s  loss {loss.item():.3f}", flush=True)
            last_log = elapsed
    model.eval()
    return losses


def run_demo(out_dir: str | Path, seconds: float = 60.0, vocab_size: int = 2048, preset: str = "tiny",
             model_overrides: dict | None = None, seq_len: int = 128, batch_size: int = 16,
             documents: int = 20000, lr: float = 3e-3, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    print(f"[1/4] writing {documents} built-in documents", flush=True)
    data = write_builtin_jsonl(out_dir / "data" / "builtin.jsonl", documents, seed=seed)

    print(f"[2/4] training a {vocab_size}-token byte-level BPE tokenizer", flush=True)
    tokenizer = train_tokenizer([data], vocab_size=vocab_size, out_dir=out_dir / "tokenizer")

    rows = pack_documents(tokenizer.encode_batch(list(_texts(data))), tokenizer.eos_id, seq_len)
    config = preset_config(preset, **{**(model_overrides or {}), "vocab_size": tokenizer.vocab_size})
    print(f"[3/4] pretraining for {seconds:.0f}s on {rows.numel():,} tokens ({len(rows)} rows of {seq_len})",
          flush=True)
    model = NanoMind(config)
    losses = pretrain_for(model, rows, seconds, batch_size, lr)
    checkpoint = save_checkpoint(model, out_dir / "model", tokenizer=tokenizer)
    print(f"  {len(losses)} steps, loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}")

    print("[4/4] sampling (greedy)", flush=True)
    for prompt, completion in zip(DEMO_PROMPTS, generate(
            model, tokenizer, DEMO_PROMPTS, SamplingParams(max_new_tokens=24, stop=["\n"]))):
        print(f"  {prompt!r} -> {completion.text!r}")
    print(f"done in {time.perf_counter() - t0:.0f}s. The checkpoint is {checkpoint}; try:\n"
          f"  nanomind generate --model {checkpoint} --prompt 'The sun rises in the'")
    return checkpoint


def _texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
