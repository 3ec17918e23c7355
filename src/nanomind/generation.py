"""Text generation: a KV-cached decode loop, sampling, stop conditions and safe text streaming.

`decode_tokens` is the engine: it left-pads a batch of prompts, prefills them in one forward pass
and then decodes one token per row per step into a preallocated KV cache. `generate` (a batch of
finished completions) and `stream` (text pieces of one completion as they appear) sit on top and
share `CompletionTracker`, which turns tokens into text and applies EOS and stop strings.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model import KVCache, NanoMind


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings; they are not part of the returned text
    eos_ids: Sequence[int] | None = None  # default: the model's eos_token_id

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                       generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). `seen` (B, V) marks tokens for the repetition penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty,
                                logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth_best = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, T) padded on the left, and the mask (B, T) of real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_tokens(model: NanoMind, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int]]:
    """Yield the next token of every row, step after step, for up to params.max_new_tokens steps.

    The caller stops iterating when it has what it needs; rows are decoded in lockstep.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, mask = left_pad(prompts, config.pad_token_id, device)
    B, T = ids.shape
    if T + params.max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"model's context of {config.max_position_embeddings} positions")
    cache = KVCache(config, B, T + params.max_new_tokens, device, dtype)
    padded = not bool(mask.all())
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())

    logits = model(ids, attention_mask=mask if padded else None, cache=cache, last_logits_only=True).logits
    for step in range(params.max_new_tokens):
        next_ids = sample_next_tokens(logits[:, -1], params, seen, generator)
        yield next_ids.tolist()
        if step + 1 == params.max_new_tokens:
            return
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        if padded:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = model(next_ids[:, None], attention_mask=mask if padded else None, cache=cache).logits


# ----------------------------------------------------------------------------------------------
# From tokens to finished text


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


class CompletionTracker:
    """Follows one row: decodes its tokens to text and decides when it is finished.

    Text is released only when it is final: a multi-byte character split across tokens is held
    until complete, and a tail that could be the start of a stop string is held until it is not.
    """

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: Sequence[int]):
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in params.stop if s]
        self.eos_ids = set(eos_ids)
        self.completion = Completion()
        self.pending = ""  # decoded, not yet released (could begin a stop string)

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    def push(self, token_id: int, is_last: bool) -> str:
        """Take the next token; return the text that became final with it."""
        if self.finished:
            return ""
        if token_id in self.eos_ids:
            self.completion.finish_reason = "stop"
            return self._release(self.pending + self.decoder.flush())
        self.completion.token_ids.append(token_id)
        self.pending += self.decoder.push(token_id)
        if is_last:
            self.completion.finish_reason = "length"
            self.pending += self.decoder.flush()
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                self.completion.finish_reason = "stop"
                return self._release(self.pending[:at])
        if self.finished:
            return self._release(self.pending)
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        return self._release(self.pending[:len(self.pending) - hold])

    def _release(self, text: str) -> str:
        self.pending = self.pending[len(text):] if not self.finished else ""
        self.completion.text += text
        return text


def _eos_ids(model: NanoMind, params: SamplingParams) -> list[int]:
    return list(params.eos_ids) if params.eos_ids is not None else [model.config.eos_token_id]


def generate(model: NanoMind, tokenizer, prompts: Sequence[str | Sequence[int]],
             params: SamplingParams | None = None) -> list[Completion]:
    """Complete a batch of prompts (text or token ids) together; one Completion per prompt."""
    params = params or SamplingParams()
    prompt_ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    trackers = [CompletionTracker(tokenizer, params, _eos_ids(model, params)) for _ in prompt_ids]
    for step, next_ids in enumerate(decode_tokens(model, prompt_ids, params)):
        is_last = step + 1 == params.max_new_tokens
        for tracker, token_id in zip(trackers, next_ids):
            tracker.push(token_id, is_last)
        if all(t.finished for t in trackers):
            break
    return [t.completion for t in trackers]


class TextStream:
    """Iterate to get the text of one completion piece by piece as it is decoded; afterwards
    `.completion` holds the token ids, full text and finish reason."""

    def __init__(self, model: NanoMind, tokenizer, prompt: str | Sequence[int],
                 params: SamplingParams | None = None):
        self.model, self.params = model, params or SamplingParams()
        self.prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.tracker = CompletionTracker(tokenizer, self.params, _eos_ids(model, self.params))

    @property
    def completion(self) -> Completion:
        return self.tracker.completion

    def __iter__(self) -> Iterator[str]:
        for step, (token_id,) in enumerate(decode_tokens(self.model, [self.prompt_ids], self.params)):
            piece = self.tracker.push(token_id, is_last=step + 1 == self.params.max_new_tokens)
            if piece:
                yield piece
            if self.tracker.finished:
                return


def stream(model: NanoMind, tokenizer, prompt: str | Sequence[int],
           params: SamplingParams | None = None) -> TextStream:
    """The text of one completion, piece by piece: `for piece in stream(model, tok, "Hi"): ...`."""
    return TextStream(model, tokenizer, prompt, params)
