"""Tokenize once, train many times: JSONL -> memory-mapped token arrays + a manifest.

A prepared folder holds, per split (`train`, `val`):
  {split}.tokens.bin   token ids (uint16 when the vocabulary fits, else uint32)
  {split}.mask.bin     1 where the token is trained (sft, dpo), uint8
  {split}.offsets.npy  where each sequence starts (int64, one more entry than sequences)
and `manifest.json` (kind, tokenizer fingerprint, source files with sizes and hashes, counts,
padding fraction, options). How sequences are laid out depends on the kind:
  pretrain  documents joined with <|endoftext|> into one stream (one sequence); the trainer reads
            windows of seq_len + 1 tokens: no padding at all
  sft       conversations rendered with the chat template, several packed per row of seq_len + 1
            tokens; the mask covers exactly the assistant turns; the row's tail is padding (mask 0)
  dpo       `chosen` and `rejected` conversations as two parallel sets of sequences (dpo.chosen,
            dpo.rejected), each with its assistant mask
  rl/agent  validated, normalised prompts as JSONL ({split}.jsonl); rollouts template them
The train/validation split hashes each line's content, so it is the same whatever the order of
files or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .data import BadLines, DataError, conversation_tools, read_records
from .tokenizer import Tokenizer

PREPARE_VERSION = 2  # 2: an assistant turn's empty think block is context, not a target
SPLITS = ("train", "val")

# MiniMind's augmentation: a random system prompt on some SFT samples, so the model does not
# depend on having one. Ours, in both languages.
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are nanomind, a small language model. Answer clearly and briefly.",
    "Answer the user's question accurately.",
    "你是一个乐于助人的助手。",
    "你是 nanomind，一个小型语言模型，请简洁准确地回答。",
    "请认真回答用户的问题。",
]
EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass
class PrepareOptions:
    kind: str
    seq_len: int
    val_fraction: float = 0.01
    seed: int = 0
    system_prompt_ratio: float = 0.0  # share of SFT samples (without tools) given a random system prompt
    empty_think_removal_ratio: float = 0.0  # share of SFT samples whose empty think blocks are removed
    skip_bad: bool = False


# ----------------------------------------------------------------------------------------------
# Rendering and masking one conversation


def assistant_loss_mask(ids: list[int], im_start: int, im_end: int, assistant_header: list[int],
                        empty_think: list[int] | None = None) -> list[int]:
    """1 for every token of an assistant turn (after `<|im_start|>assistant\\n`, up to and including
    `<|im_end|>`), else 0. One left-to-right pass: the header is only compared at `<|im_start|>`.

    A turn that opens with the `empty_think` tokens (`<think>\\n\\n</think>\\n\\n`) is trained from its
    first token after them. That block is how the chat template switches thinking off, and with thinking
    off the generation prompt already ends with it; trained as a target, it would teach the model to
    close every block the prompt opens, so that with thinking on it would never reason.
    """
    mask = [0] * len(ids)
    header_length = len(assistant_header)
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == im_start and ids[i + 1:i + 1 + header_length] == assistant_header:
            i += 1 + header_length
            if empty_think and ids[i:i + len(empty_think)] == empty_think:
                i += len(empty_think)
            while i < n:
                mask[i] = 1
                if ids[i] == im_end:
                    break
                i += 1
        i += 1
    return mask


class ConversationEncoder:
    """Turns a normalised conversation into (ids, assistant mask), with MiniMind's augmentations."""

    def __init__(self, tokenizer: Tokenizer, options: PrepareOptions):
        self.tokenizer, self.options = tokenizer, options
        self.im_start = tokenizer.token_to_id("<|im_start|>")
        self.im_end = tokenizer.token_to_id("<|im_end|>")
        self.assistant_header = tokenizer.encode("assistant") + tokenizer.encode("\n")
        self.empty_think = tokenizer.encode(EMPTY_THINK)

    def render(self, messages: list[dict], rng: random.Random | None = None) -> str:
        tools = conversation_tools(messages)
        if rng and not tools and messages[0]["role"] != "system" and rng.random() < self.options.system_prompt_ratio:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tools=tools)
        if rng and rng.random() < self.options.empty_think_removal_ratio:
            text = text.replace(EMPTY_THINK, "")
        return text

    def mask(self, ids: list[int]) -> list[int]:
        return assistant_loss_mask(ids, self.im_start, self.im_end, self.assistant_header, self.empty_think)

    def encode(self, messages: list[dict], rng: random.Random | None = None) -> tuple[list[int], list[int]]:
        ids = self.tokenizer.encode(self.render(messages, rng))
        return ids, self.mask(ids)


def record_rng(seed: int, key: str) -> random.Random:
    """A random stream per record, so augmentations do not depend on order or worker count."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))


def split_of(key: str, val_fraction: float, seed: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"split:{seed}:{key}".encode()).digest()[:8], "little")
    return "val" if h / 2**64 < val_fraction else "train"


# ----------------------------------------------------------------------------------------------
# Worker side: records -> token sequences

_worker: dict = {}


def token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32


def _init_worker(tokenizer_dir: str, options: PrepareOptions) -> None:
    tokenizer = Tokenizer.load(tokenizer_dir)
    _worker.update(tokenizer=tokenizer, options=options, encoder=ConversationEncoder(tokenizer, options),
                   dtype=token_dtype(tokenizer))


def _encode_chunk(chunk: list[tuple[str, dict]]) -> list[tuple[str, list]]:
    """[(key, record)] -> [(key, sequences)] where sequences is a list of (ids, mask or None), as numpy
    arrays: the main process unpickles them ~5x faster than lists of Python ints."""
    tokenizer, options, encoder, dtype = _worker["tokenizer"], _worker["options"], _worker["encoder"], _worker["dtype"]
    if options.kind == "pretrain":
        ids_list = tokenizer.encode_batch([record["text"] for _, record in chunk])
        end_of_text = tokenizer.pad_id  # <|endoftext|> both separates documents and pads
        return [(key, [(np.array(ids + [end_of_text], dtype), None)]) for (key, _), ids in zip(chunk, ids_list)]
    # Render every conversation of the chunk, then encode them in one batch (Rust, all cores).
    texts = []
    for key, record in chunk:
        rng = record_rng(options.seed, key)
        if options.kind == "sft":
            texts.append(encoder.render(record["conversations"], rng))
        else:  # dpo: both sides get the same augmentation draws, so they differ only in the answer
            state = rng.getstate()
            texts.append(encoder.render(record["chosen"], rng))
            rng.setstate(state)
            texts.append(encoder.render(record["rejected"], rng))
    ids_list = tokenizer.encode_batch(texts)
    sequences = [(np.array(ids, dtype), np.array(encoder.mask(ids), np.uint8)) for ids in ids_list]
    per_record = 1 if options.kind == "sft" else 2
    return [(key, sequences[i * per_record:(i + 1) * per_record]) for i, (key, _) in enumerate(chunk)]


# ----------------------------------------------------------------------------------------------
# Writing token stores


class TokenStoreWriter:
    """Appends sequences to {name}.tokens.bin / .mask.bin and records their offsets."""

    def __init__(self, folder: Path, name: str, dtype, with_mask: bool):
        self.name = name
        self.tokens = open(folder / f"{name}.tokens.bin", "wb")
        self.mask = open(folder / f"{name}.mask.bin", "wb") if with_mask else None
        self.dtype, self.offsets, self.folder = dtype, [0], folder

    def append(self, ids, mask=None) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def extend_last(self, ids) -> None:
        """Grow the last sequence (the pretraining stream is one sequence)."""
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.offsets[-1] += len(ids)

    def close(self) -> None:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        np.save(self.folder / f"{self.name}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))


class RowPacker:
    """Packs (ids, mask) conversations into rows of `row_len` tokens; the tail of a row is padding.

    First fit in arrival order: a conversation that does not fit the current row starts a new one;
    one longer than a row is truncated (and counted).
    """

    def __init__(self, writer: TokenStoreWriter, row_len: int, pad_id: int):
        self.writer, self.row_len = writer, row_len
        self.padding_ids = np.full(row_len, pad_id, dtype=writer.dtype)
        self.ids, self.mask, self.length = [], [], 0  # the current row's conversations
        self.rows = self.padding = self.truncated = self.sequences = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if len(ids) > self.row_len:
            ids, mask = ids[:self.row_len], mask[:self.row_len]
            self.truncated += 1
        if self.length + len(ids) > self.row_len:
            self.flush()
        self.ids.append(ids)
        self.mask.append(mask)
        self.length += len(ids)
        self.sequences += 1

    def flush(self) -> None:
        if not self.ids:
            return
        pad = self.row_len - self.length
        self.writer.append(np.concatenate([*self.ids, self.padding_ids[:pad]]),
                           np.concatenate([*self.mask, np.zeros(pad, np.uint8)]))
        self.rows += 1
        self.padding += pad
        self.ids, self.mask, self.length = [], [], 0


# ----------------------------------------------------------------------------------------------
# The prepare step


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(files, tokenizer_dir, out_dir, options: PrepareOptions, workers: int = 1,
            chunk_size: int = 256, verbose: bool = True) -> dict:
    """Tokenize `files` into `out_dir`; returns the manifest. A no-op when the same inputs were
    already prepared there (same files, tokenizer and options)."""
    files = [Path(f) for f in files]
    out_dir = Path(out_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_digest(f)} for f in files]
    key = hashlib.sha256(json.dumps(
        [PREPARE_VERSION, tokenizer.fingerprint(), [s["sha256"] for s in sources], asdict(options)],
        sort_keys=True).encode()).hexdigest()
    existing = out_dir / "manifest.json"
    if existing.exists() and json.loads(existing.read_text()).get("key") == key:
        if verbose:
            print(f"{out_dir}: already prepared from the same inputs, nothing to do")
        return json.loads(existing.read_text())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = _prepare_into(files, tokenizer, str(tokenizer_dir), tmp, options, workers, chunk_size)
        manifest.update(key=key, sources=sources, tokenizer_fingerprint=tokenizer.fingerprint(),
                        version=PREPARE_VERSION, options=asdict(options))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _print_summary(out_dir, manifest)
    return manifest


def _prepare_into(files, tokenizer, tokenizer_dir, folder: Path, options: PrepareOptions,
                  workers: int, chunk_size: int) -> dict:
    bad_lines = BadLines()
    # A record's key is the hash of its content: it decides the split and seeds its augmentations,
    # so neither depends on file order or the number of workers.
    records = ((hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest(), record)
               for _, _, record in read_records(files, options.kind, options.skip_bad, bad_lines))
    counts = {split: 0 for split in SPLITS}
    if options.kind in ("rl", "agent"):
        outputs = {split: open(folder / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
        for key, record in records:
            split = split_of(key, options.val_fraction, options.seed)
            outputs[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
        for f in outputs.values():
            f.close()
        return {"kind": options.kind, "records": counts, "bad_lines": bad_lines.to_dict()}

    dtype = token_dtype(tokenizer)
    with_mask = options.kind != "pretrain"
    names = ["dpo.chosen", "dpo.rejected"] if options.kind == "dpo" else [None]
    writers = {(split, name): TokenStoreWriter(folder, f"{split}.{name}" if name else split, dtype, with_mask)
               for split in SPLITS for name in names}
    packers = ({split: RowPacker(writers[split, None], options.seq_len + 1, tokenizer.pad_id) for split in SPLITS}
               if options.kind == "sft" else {})
    tokens = {split: 0 for split in SPLITS}
    truncated = 0

    chunks = _chunks(records, chunk_size)
    if workers > 1:
        # spawn, not fork: the parent's tokenizer has Rust thread pools that do not survive a fork.
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir, options))
        encoded_chunks = pool.imap(_encode_chunk, chunks)
    else:
        pool = None
        _init_worker(tokenizer_dir, options)
        encoded_chunks = map(_encode_chunk, chunks)
    try:
        for encoded in encoded_chunks:
            for key, sequences in encoded:
                split = split_of(key, options.val_fraction, options.seed)
                counts[split] += 1
                tokens[split] += sum(len(ids) for ids, _ in sequences)
                if options.kind == "pretrain":
                    writer = writers[split, None]
                    if len(writer.offsets) == 1:
                        writer.append(np.zeros(0, dtype))
                    writer.extend_last(sequences[0][0])
                elif options.kind == "sft":
                    packers[split].add(*sequences[0])
                else:
                    for name, (ids, mask) in zip(names, sequences):
                        if len(ids) > options.seq_len + 1:
                            ids, mask = ids[:options.seq_len + 1], mask[:options.seq_len + 1]
                            truncated += 1
                        writers[split, name].append(ids, mask)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for packer in packers.values():
        packer.flush()
    for writer in writers.values():
        writer.close()

    manifest = {"kind": options.kind, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                "seq_len": options.seq_len, "records": counts, "tokens": tokens, "bad_lines": bad_lines.to_dict()}
    if packers:
        rows = sum(p.rows for p in packers.values())
        padding = sum(p.padding for p in packers.values())
        manifest.update(rows={s: p.rows for s, p in packers.items()},
                        truncated=sum(p.truncated for p in packers.values()),
                        padding_fraction=padding / max(rows * (options.seq_len + 1), 1))
    else:
        manifest.update(truncated=truncated, padding_fraction=0.0)
    return manifest


def _chunks(iterable, size):
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _print_summary(out_dir: Path, manifest: dict) -> None:
    print(f"prepared {manifest['kind']} data -> {out_dir}")
    print(f"  records: {manifest['records']}")
    if "tokens" in manifest:
        print(f"  tokens: {manifest['tokens']}, padding {manifest['padding_fraction']:.1%}, "
              f"truncated {manifest['truncated']}")
    bad = manifest["bad_lines"]
    if bad["total"]:
        print(f"  skipped {bad['total']} bad lines: {bad['counts']}")
        for examples in bad["examples"].values():
            for example in examples:
                print(f"    {example}")


def load_manifest(prepared_dir, tokenizer: Tokenizer | None = None, kind: str | None = None) -> dict:
    """Read a prepared folder's manifest; refuse data made with another tokenizer or of another kind."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{prepared_dir}: not a prepared data folder (no manifest.json); run `nanomind prepare`")
    manifest = json.loads(path.read_text())
    if kind and manifest["kind"] != kind:
        raise DataError(f"{prepared_dir}: holds {manifest['kind']} data, this stage needs {kind} data")
    if tokenizer is not None and manifest["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise DataError(f"{prepared_dir}: prepared with a different tokenizer than the model's "
                        f"(fingerprint {manifest['tokenizer_fingerprint'][:12]} vs {tokenizer.fingerprint()[:12]}); "
                        "prepare the data again with this tokenizer")
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading prepared data as training rows


def _inputs_and_targets(tokens: np.ndarray, trained: np.ndarray) -> dict:
    """(B, T + 1) int64 tokens and where a token is trained -> tensors: inputs (B, T), and targets (B, T),
    the next tokens, -100 where not trained."""
    # Imported here, not at the top: prepare's worker processes import this module and need no torch
    # (importing it costs each of them ~3 s).
    import torch
    return {"inputs": torch.from_numpy(tokens[:, :-1]),
            "targets": torch.from_numpy(np.where(trained[:, 1:], tokens[:, 1:], -100))}


class TokenStore:
    """Read side of TokenStoreWriter: memory-mapped tokens (+ mask) and sequence offsets."""

    def __init__(self, folder: Path, name: str, dtype: str):
        self.tokens = np.memmap(folder / f"{name}.tokens.bin", dtype=dtype, mode="r") \
            if (folder / f"{name}.tokens.bin").stat().st_size else np.zeros(0, dtype=dtype)
        mask_path = folder / f"{name}.mask.bin"
        self.mask = (np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.exists() and mask_path.stat().st_size
                     else None)
        self.offsets = np.load(folder / f"{name}.offsets.npy")


class PretrainRows:
    """Windows of seq_len + 1 tokens over the document stream, overlapping by one token, so every
    token is a target exactly once; the last window is completed with ignored targets."""

    def __init__(self, store: TokenStore, seq_len: int, pad_id: int):
        self.tokens, self.seq_len, self.pad_id = store.tokens, seq_len, pad_id

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.tokens) - 1) / self.seq_len))

    def rows(self, indices) -> dict:
        L = self.seq_len
        batch = np.full((len(indices), L + 1), self.pad_id, dtype=np.int64)
        valid = np.zeros((len(indices), L + 1), dtype=bool)
        for r, i in enumerate(np.asarray(indices)):
            window = self.tokens[i * L: i * L + L + 1]
            batch[r, :len(window)] = window
            valid[r, :len(window)] = True
        return _inputs_and_targets(batch, valid)


class PackedRows:
    """Rows of seq_len + 1 tokens with a loss mask (SFT): targets are the masked next tokens."""

    def __init__(self, store: TokenStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.offsets) - 1

    def rows(self, indices) -> dict:
        starts = self.store.offsets[np.asarray(indices)]
        row_len = int(self.store.offsets[1] - self.store.offsets[0])
        span = starts[:, None] + np.arange(row_len)
        return _inputs_and_targets(self.store.tokens[span].astype(np.int64), self.store.mask[span].astype(bool))


class PreferenceRows:
    """DPO pairs: row i is (chosen i, rejected i). A batch of B pairs is one (2B, T) batch, the B chosen
    rows first, then the B rejected rows, right-padded to its longest sequence; targets are the next
    tokens on the assistant turns, -100 elsewhere (prompt and padding)."""

    def __init__(self, chosen: TokenStore, rejected: TokenStore, pad_id: int):
        if len(chosen.offsets) != len(rejected.offsets):
            raise DataError("prepared DPO data: the chosen and rejected sets differ in length; prepare it again")
        self.stores, self.pad_id = (chosen, rejected), pad_id

    def __len__(self) -> int:
        return len(self.stores[0].offsets) - 1

    def rows(self, indices) -> dict:
        indices = np.asarray(indices)
        spans = [(store, int(store.offsets[i]), int(store.offsets[i + 1])) for store in self.stores for i in indices]
        length = max(end - start for _, start, end in spans)
        tokens = np.full((len(spans), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(spans), length), dtype=bool)
        for r, (store, start, end) in enumerate(spans):
            tokens[r, :end - start] = store.tokens[start:end]
            mask[r, :end - start] = store.mask[start:end]
        return _inputs_and_targets(tokens, mask)


class PromptRows:
    """RL prompts: the validated records of {split}.jsonl, in file order (rollouts template them)."""

    def __init__(self, path: Path):
        with path.open(encoding="utf-8") as f:
            self.records = [json.loads(line) for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, indices) -> list[dict]:
        return [self.records[int(i)] for i in indices]


def open_rows(prepared_dir, split: str, manifest: dict, pad_id: int):
    """The training rows of one split of a prepared folder (None if it is empty): token rows for
    pretrain, SFT and DPO, prompt records for RL and agent RL."""
    folder = Path(prepared_dir)
    if manifest["kind"] in ("rl", "agent"):
        rows = PromptRows(folder / f"{split}.jsonl")
        return rows if len(rows) else None
    if manifest["kind"] == "dpo":
        rows = PreferenceRows(TokenStore(folder, f"{split}.dpo.chosen", manifest["dtype"]),
                              TokenStore(folder, f"{split}.dpo.rejected", manifest["dtype"]), pad_id)
        return rows if len(rows) else None
    store = TokenStore(folder, split, manifest["dtype"])
    rows = (PretrainRows(store, manifest["seq_len"], pad_id) if manifest["kind"] == "pretrain"
            else PackedRows(store))
    return rows if len(rows) else None
