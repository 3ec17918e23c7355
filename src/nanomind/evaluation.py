"""Held-out measurements of a checkpoint: loss, perplexity and bits per byte on a JSONL file.

The file is tokenized exactly as for training (`prepare`: documents packed for pretrain text,
conversations rendered with the chat template and scored on the assistant tokens only), so the
numbers compare directly with the trainer's validation loss.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from .prepare import PrepareOptions, load_manifest, open_rows, prepare


@torch.no_grad()
def held_out_loss(model, tokenizer, tokenizer_dir, files, kind: str = "sft", seq_len: int = 512,
                  batch_size: int = 8, limit_rows: int | None = None) -> dict:
    """Mean next-token loss per scored token over `files` (kind "pretrain" or "sft"), with perplexity
    and bits per byte (the loss in bits spread over the UTF-8 bytes of the scored tokens, which
    compares models with different tokenizers)."""
    device = next(model.parameters()).device
    token_bytes = torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], device=device)
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="nanomind-eval-") as folder:
        prepare([Path(f) for f in files], tokenizer_dir, folder,
                PrepareOptions(kind=kind, seq_len=seq_len, val_fraction=0.0), verbose=False)
        rows = open_rows(folder, "train", load_manifest(folder, tokenizer, kind), tokenizer.pad_id)
        n_rows = min(len(rows), limit_rows or len(rows))
        loss_sum, tokens, n_bytes = 0.0, 0, 0
        for start in range(0, n_rows, batch_size):
            batch = {k: v.to(device) for k, v in rows.rows(range(start, min(start + batch_size, n_rows))).items()}
            scored = batch["targets"][batch["targets"] != -100]
            loss_sum += model(batch["inputs"], targets=batch["targets"]).loss.item() * len(scored)
            tokens += len(scored)
            n_bytes += int(token_bytes[scored].sum())
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1),
            "tokens": tokens, "rows": n_rows}


@torch.no_grad()
def preference_accuracy(model, tokenizer, tokenizer_dir, files, seq_len: int = 512, batch_size: int = 8,
                        reference=None) -> dict:
    """Share of DPO pairs whose chosen answer the model scores above the rejected one (summed
    log-probability of the assistant tokens). With a `reference` model, the comparison is of the
    implicit rewards (policy minus reference log-probabilities), as DPO's reward accuracy."""
    from .dpo import sequence_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wins, margins, pairs = 0, 0.0, 0
    with tempfile.TemporaryDirectory(prefix="nanomind-eval-") as folder:
        prepare([Path(f) for f in files], tokenizer_dir, folder,
                PrepareOptions(kind="dpo", seq_len=seq_len, val_fraction=0.0), verbose=False)
        rows = open_rows(folder, "train", load_manifest(folder, tokenizer, "dpo"), tokenizer.pad_id)
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in rows.rows(range(start, min(start + batch_size, len(rows)))).items()}
            logps = sequence_logps(model(batch["inputs"]).logits, batch["targets"])[0]
            if reference is not None:
                logps = logps - sequence_logps(reference(batch["inputs"]).logits, batch["targets"])[0]
            chosen, rejected = logps.chunk(2)
            wins += int((chosen > rejected).sum())
            margins += float((chosen - rejected).sum())
            pairs += len(chosen)
    model.train(was_training)
    return {"accuracy": wins / max(pairs, 1), "mean_margin": margins / max(pairs, 1), "pairs": pairs}
