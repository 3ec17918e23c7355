"""Continuous batching: one background thread decodes every active request together.

The running batch shares one KV cache timeline. Each row's tokens are right-aligned in it: row i
holds its prompt and its generated tokens in the last len_i columns, and the columns before them are
padding (attention mask 0). Because the model derives rotary positions from the mask's cumsum, a row
sees exactly what it would see decoded alone.

One engine step:
  1. admit waiting requests (up to --max-batch rows): prefill their prompts together (left-padded)
     into a small cache and merge it into the shared timeline, padding the running rows on the left
     if a new prompt is longer than the timeline;
  2. run one forward pass over the last sampled token of every row;
  3. sample each row with its own parameters and random generator, hand the new text to the
     request's callback, and drop rows that finished or whose client went away (index_select),
     then trim leading columns that are padding for every row.

Greedy rows give the same tokens as `generation.generate` on that prompt alone, and a seeded
sampled row the same as it would alone: each request draws from its own torch.Generator.
"""

from __future__ import annotations

import collections
import random
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import CompletionTracker, SamplingParams, left_pad, sample_next_tokens
from ..model import KVCache, NanoMind

CAPACITY_STEP = 64  # the shared cache grows by this many columns at a time


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


class EngineStopped(Exception):
    """The engine was shut down."""


# What the engine reports to a request's owner, from the engine thread:
#   on_update(text_piece, finish_reason, completion_tokens)
# finish_reason is None while running, then "stop", "length", "cancelled" or "error: <message>".
UpdateCallback = Callable[[str, "str | None", int], None]


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_update: UpdateCallback
    presence_penalty: float = 0.0  # OpenAI's: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtract per occurrence in the generated tokens
    # set by the engine
    tracker: CompletionTracker | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    seen: torch.Tensor | None = field(default=None, repr=False)  # (V,) bool, for repetition_penalty
    counts: torch.Tensor | None = field(default=None, repr=False)  # (V,) generated-token counts
    generated: int = 0
    last_token: int = -1
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; it does so before its next step."""
        self.cancelled = True

    @property
    def greedy(self) -> bool:
        p = self.params
        return (p.temperature == 0 and p.repetition_penalty == 1.0
                and self.presence_penalty == 0 and self.frequency_penalty == 0)


def apply_presence_frequency_penalties(logits: torch.Tensor, counts: torch.Tensor,
                                       presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties on logits (1, V): minus presence for a token generated at least once,
    minus frequency times the number of times it was generated."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


class Engine:
    """Owns the model; `submit` requests from any thread, results arrive through their callbacks."""

    def __init__(self, model: NanoMind, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 eos_ids: Sequence[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = list(eos_ids) if eos_ids is not None else sorted(
            {model.config.eos_token_id, tokenizer.eos_id})
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.active: list[EngineRequest] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cache.length), 1 = real token
        self.steps = 0
        self.cancelled = 0  # requests dropped because their client went away
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanomind-engine", daemon=True)

    # -- public API (any thread) ----------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, request: EngineRequest) -> EngineRequest:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        with self._wakeup:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.active)} requests are running and {len(self.waiting)} waiting "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self._wakeup.notify()
        return request

    def load(self) -> dict:
        return {"running": len(self.active), "waiting": len(self.waiting), "cancelled": self.cancelled,
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    # -- the loop (engine thread) ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self.waiting and not self.active:
                    self._wakeup.wait()
                if self._stopping:
                    break
                admitted = []
                while self.waiting and len(self.active) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for request in admitted:
                        if request.cancelled:
                            request.on_update("", "cancelled", 0)
                    if any(not r.cancelled for r in admitted):
                        self._admit([r for r in admitted if not r.cancelled])
                    self._drop_finished()
                    if self.active:
                        self._step()
            except Exception as e:  # a failed step must not take the server down with it
                traceback.print_exc()
                failed = {id(r): r for r in [*self.active, *admitted]}.values()
                for request in failed:
                    if request.tracker is None or not request.tracker.finished:
                        request.on_update("", f"error: {type(e).__name__}: {e}", request.generated)
                self.active, self.cache, self.mask = [], None, None
        for request in [*self.active, *self.waiting]:
            request.on_update("", "cancelled", request.generated)

    def _admit(self, requests: list[EngineRequest]) -> None:
        """Prefill the new prompts together (left-padded), sample their first tokens, merge their K/V."""
        ids, mask = left_pad([r.prompt_ids for r in requests], self.config.pad_token_id, self.device)
        prefill = KVCache(self.config, ids.shape[0], ids.shape[1], self.device, self.dtype)
        padded = not bool(mask.all())
        logits = self.model(ids, attention_mask=mask if padded else None, cache=prefill,
                            last_logits_only=True).logits[:, -1]
        vocab = self.config.vocab_size
        for request in requests:
            p = request.params
            request.tracker = CompletionTracker(self.tokenizer, p, p.eos_ids if p.eos_ids is not None else self.eos_ids)
            request.generator = torch.Generator(device=self.device)
            request.generator.manual_seed(p.seed if p.seed is not None else random.randrange(2**63))
            if p.repetition_penalty != 1.0:
                request.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                request.seen[torch.tensor(request.prompt_ids, device=self.device)] = True
            if request.presence_penalty or request.frequency_penalty:
                request.counts = torch.zeros(vocab, dtype=torch.long, device=self.device)
        self._merge(prefill, mask)
        self.active.extend(requests)
        for i, request in enumerate(requests):
            self._take(request, self._sample(request, logits[i:i + 1]))

    def _step(self) -> None:
        B = len(self.active)
        if self.cache.length + 1 > self.cache.capacity:
            self._reshape_cache(rows=None, front=0, capacity=self.cache.length + CAPACITY_STEP)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        inputs = torch.tensor([[r.last_token] for r in self.active], device=self.device)
        padded = not bool(self.mask.all())
        logits = self.model(inputs, attention_mask=self.mask if padded else None, cache=self.cache).logits[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(self.active):
            token = greedy[i] if request.greedy else self._sample(request, logits[i:i + 1])
            self._take(request, token)
        self.steps += 1
        self._drop_finished()

    def _sample(self, request: EngineRequest, logits: torch.Tensor) -> int:
        """logits (1, V) -> the row's next token, with the row's own parameters and generator."""
        if request.counts is not None:
            logits = apply_presence_frequency_penalties(logits.float(), request.counts,
                                                        request.presence_penalty, request.frequency_penalty)
        seen = request.seen[None] if request.seen is not None else None
        return int(sample_next_tokens(logits, request.params, seen, request.generator)[0])

    def _take(self, request: EngineRequest, token: int) -> None:
        request.generated += 1
        request.last_token = token
        if request.seen is not None:
            request.seen[token] = True
        if request.counts is not None:
            request.counts[token] += 1
        piece = request.tracker.push(token, is_last=request.generated >= request.params.max_new_tokens)
        if piece or request.tracker.finished:
            request.on_update(piece, request.tracker.completion.finish_reason, request.generated)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.active) if not (r.cancelled or r.tracker.finished)]
        if len(keep) == len(self.active):
            return
        for r in self.active:
            if r.cancelled and not r.tracker.finished:
                self.cancelled += 1
                r.on_update("", "cancelled", r.generated)
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self.cache, self.mask = None, None
            return
        rows = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, rows)
        front = int(mask.any(dim=0).long().argmax())  # leading columns that are padding in every row
        self._reshape_cache(rows=rows, front=-front, capacity=self.cache.capacity - front)

    # -- the shared cache -----------------------------------------------------------------------

    def _merge(self, prefill: KVCache, prefill_mask: torch.Tensor) -> None:
        """Append prefilled rows, right-aligned with the running rows' last positions."""
        if self.cache is None:
            self.cache, self.mask = prefill, prefill_mask
            return
        width = prefill_mask.shape[1]
        length = max(self.cache.length, width)
        self._reshape_cache(rows=None, front=length - self.cache.length, capacity=length + CAPACITY_STEP)
        B, n = self.mask.shape[0], prefill_mask.shape[0]
        cache = self._new_cache(B + n, self.cache.capacity)
        cache.keys[:, :B], cache.values[:, :B] = self.cache.keys, self.cache.values
        cache.keys[:, B:, :, length - width:length] = prefill.keys[:, :, :, :width]
        cache.values[:, B:, :, length - width:length] = prefill.values[:, :, :, :width]
        cache.length = length
        new_mask = prefill_mask.new_zeros(n, length)
        new_mask[:, length - width:] = prefill_mask
        self.cache, self.mask = cache, torch.cat([self.mask, new_mask], dim=0)

    def _reshape_cache(self, rows: torch.Tensor | None, front: int, capacity: int) -> None:
        """Keep `rows` (all if None), add `front` padding columns on the left (drop them if < 0),
        and reallocate to `capacity` columns."""
        old, mask = self.cache, self.mask
        if rows is not None:
            mask = mask.index_select(0, rows)
        keys, values = old.keys[:, :, :, :old.length], old.values[:, :, :, :old.length]
        if rows is not None:
            keys, values = keys.index_select(1, rows), values.index_select(1, rows)
        if front < 0:
            keys, values, mask = keys[:, :, :, -front:], values[:, :, :, -front:], mask[:, -front:]
        length = mask.shape[1] + max(front, 0)
        cache = self._new_cache(mask.shape[0], max(capacity, length))
        cache.keys[:, :, :, length - keys.shape[3]:length] = keys
        cache.values[:, :, :, length - keys.shape[3]:length] = values
        cache.length = length
        if front > 0:
            mask = torch.cat([mask.new_zeros(mask.shape[0], front), mask], dim=1)
        self.cache, self.mask = cache, mask

    def _new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch, capacity, self.device, self.dtype)
