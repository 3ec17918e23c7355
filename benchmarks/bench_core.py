"""nanomind vs transformers' Qwen3 on CPU: training throughput, decode speed and matmul utilisation.

Both implementations run side by side in one process, on the same CPU and thread count, in fp32,
with the same config, batch and weights: nanomind's model is built first, then
`transformers.Qwen3ForCausalLM` is built from `config_to_hf(config)` and nanomind's state dict is
loaded into it, so the two compute the same function (checked before anything is timed).

    python benchmarks/bench_core.py            # full run, prints a Markdown table
    python benchmarks/bench_core.py --quick    # smoke run: small shapes, few steps
    python benchmarks/bench_core.py --write    # full run, and rewrite benchmarks/RESULTS.md

What is measured:

* training step tokens/s (forward + backward + AdamW step, next-token loss) for the `tiny` and
  `base` presets; warm-up steps are excluded, the two implementations are interleaved (A B B A ...)
  so that drift in the machine's speed hits both alike, and the median step time is reported;
* batch-1 greedy decode tokens/s for `base` (prefill of the prompt included): nanomind's
  `decode_tokens` against `Qwen3ForCausalLM.generate(do_sample=False, min_new_tokens=N)`;
* the best fp32 matmul throughput this CPU reaches (torch.mm, square and model-shaped operands) and
  the model FLOPs utilisation of the `base` training step against it, eager and under torch.compile
  (what `nanomind pretrain --compile` runs: the trainer compiles the same model).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanomind.checkpoint import config_to_hf
from nanomind.generation import SamplingParams, decode_tokens
from nanomind.model import ModelConfig, NanoMind, preset_config

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

TARGETS = {
    "train_tiny": 1.10,  # nanomind tokens/s >= 1.1x transformers
    "train_base": 1.00,
    "mfu_base": 75.0,  # % of the measured fp32 matmul peak
    "decode_base": 1.25,
}


# ----------------------------------------------------------------------------------------------
# Models


def build_pair(config: ModelConfig, seed: int = 0):
    """nanomind's model and a transformers Qwen3ForCausalLM holding the same weights, both fp32."""
    import transformers

    torch.manual_seed(seed)
    nano = NanoMind(config, verbose=False).float()
    hf_dict = config_to_hf(config)
    hf_dict.pop("torch_dtype", None)  # deprecated in transformers 5; passed as dtype below
    try:
        hf_config = transformers.Qwen3Config(**hf_dict)
    except TypeError:  # a stricter Qwen3Config: drop the keys it does not name
        accepted = set(inspect.signature(transformers.Qwen3Config.__init__).parameters)
        hf_config = transformers.Qwen3Config(**{k: v for k, v in hf_dict.items() if k in accepted})
    hf = transformers.Qwen3ForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                                    dtype=torch.float32).float()
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers picked {hf.config._attn_implementation!r} attention, not sdpa")
    result = hf.load_state_dict(nano.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config.pad_token_id = config.pad_token_id
    return nano, hf


def check_same_function(nano, hf, config: ModelConfig, seq_len: int) -> dict:
    """Same batch through both: logits and losses must agree (float32 round-off only)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        a_logits, a_loss = nano(ids).logits, nano(ids, targets=targets).loss
        b = hf(input_ids=ids, labels=ids)
    logit_diff = (a_logits - b.logits).abs().max().item()
    loss_diff = abs(a_loss.item() - b.loss.item())
    if logit_diff > 1e-3 or loss_diff > 1e-4:
        raise RuntimeError(f"the two models disagree: max |logit diff| {logit_diff:.2e}, "
                           f"|loss diff| {loss_diff:.2e}")
    return {"logit_diff": logit_diff, "loss_diff": loss_diff}


# ----------------------------------------------------------------------------------------------
# Training throughput


def make_train_step(model, kind: str, ids: torch.Tensor, targets: torch.Tensor):
    """One optimiser step on a fixed batch. nanomind takes targets already shifted; transformers
    takes labels = inputs and shifts them itself (its loss then covers T-1 positions per row)."""
    # The fused AdamW kernel is what both sides train with: nanomind's trainer, and transformers'
    # Trainer by default (optim="adamw_torch_fused" with torch >= 2.8).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if kind == "nanomind":
            loss = model(ids, targets=targets).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


class CpuWatch:
    """How much CPU other processes (and the hypervisor, as steal time) took while a block ran.

    /proc/stat's busy time of the whole machine minus this process's own CPU time: on a small
    shared machine, another job on one core slows a 2-thread step down several times over (the
    OpenMP threads wait for each other), so such steps are retried rather than averaged in.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = self._busy() is not None

    def _busy(self) -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / self.tick

    def start(self):
        return self._busy(), time.process_time(), time.perf_counter()

    def stop(self, mark) -> tuple[float, float]:
        """(wall seconds, average number of cores busy with other work)."""
        busy0, own0, t0 = mark
        wall = time.perf_counter() - t0
        if busy0 is None:
            return wall, 0.0
        others = (self._busy() - busy0) - (time.process_time() - own0)
        return wall, max(others, 0.0) / max(wall, 1e-9)


CONTENDED_CORES = 0.25  # a step during which other work kept >= this many cores busy is retried


def interleaved_timing(steps: dict, warmup: int, timed: int, max_rounds: int | None = None,
                       budget_s: float | None = None) -> dict:
    """Run the step functions in alternating order (A B, B A, A B, ...) after `warmup` rounds.

    A round counts when no step in it ran while other processes were busy on the CPU; rounds are
    added until `timed` clean ones are collected, or `max_rounds` / `budget_s` run out (then every
    timed round counts, and the result says so). Returns {"times": {name: [s]}, "rounds": ...,
    "discarded": ...}.
    """
    watch = CpuWatch()
    names = list(steps)
    max_rounds = max_rounds or 3 * timed
    clean = {n: [] for n in names}
    everything = {n: [] for n in names}
    start, rounds, discarded = time.perf_counter(), 0, 0
    i = 0
    while True:
        order = names if i % 2 == 0 else names[::-1]
        got, contended = {}, 0.0
        for n in order:
            mark = watch.start()
            steps[n]()
            got[n], others = watch.stop(mark)
            contended = max(contended, others)
        i += 1
        if i <= warmup:
            continue
        rounds += 1
        for n in names:
            everything[n].append(got[n])
        if contended < CONTENDED_CORES:
            for n in names:
                clean[n].append(got[n])
        else:
            discarded += 1
            time.sleep(2)  # let the other job move on before retrying
        if len(clean[names[0]]) >= timed or rounds >= max_rounds:
            break
        if budget_s is not None and time.perf_counter() - start > budget_s and rounds >= timed:
            break
    enough = len(clean[names[0]]) >= max(2, timed // 2)
    return {"times": clean if enough else everything, "rounds": rounds, "discarded": discarded,
            "contended": not enough}


MATRIX_KERNELS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
PROFILED_STEPS = 2


def matrix_seconds(step, steps: int = PROFILED_STEPS) -> tuple[float, float]:
    """(seconds in matrix products, i.e. matmuls and attention kernels, per step; their share of the
    step's wall time) from torch.profiler over `steps` steps: what bounds the utilisation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    matrix_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATRIX_KERNELS) / 1e6
    return matrix_s / steps, matrix_s / wall


def train_flops_per_step(config: ModelConfig, n_params: int, batch: int, seq: int) -> tuple[float, float]:
    """(dense FLOPs, attention FLOPs) of one training step.

    dense = 6 * params * tokens (forward 2, backward 4 per parameter and token; the tied embedding
    is counted once, as the lm_head matmul; the embedding lookup itself is free).
    attention = 6 * layers * heads * head_dim * seq^2 * batch: QK^T and AV take 4*T^2*D per head
    forward, halved by the causal mask, times 3 for forward + backward
    (= 12 * layers * seq * head_dim * heads * tokens / 2).
    """
    tokens = batch * seq
    dense = 6 * n_params * tokens
    attention = 12 * config.num_hidden_layers * seq * config.head_dim * config.num_attention_heads * tokens / 2
    return dense, attention


@dataclass
class TrainResult:
    preset: str
    batch: int
    seq: int
    times: dict[str, list[float]]
    check: dict
    n_params: int
    flops: tuple[float, float] = (0.0, 0.0)
    rounds: int = 0
    discarded: int = 0
    contended: bool = False
    matrix_share: float | None = None  # nanomind's, for `base`
    matrix_s: float | None = None  # seconds per step in matrix products

    def tokens_per_s(self, kind: str) -> float:
        return self.batch * self.seq / statistics.median(self.times[kind])


COMPILED = "nanomind --compile"


def bench_training(preset: str, batch: int, seq: int, warmup: int, timed: int, log,
                   budget_s: float | None = None, compiled: bool = False) -> TrainResult:
    config = preset_config(preset)
    nano, hf = build_pair(config)
    check = check_same_function(nano, hf, config, min(seq, 128))
    g = torch.Generator().manual_seed(2)
    chunk = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
    ids, targets = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
    steps = {"nanomind": make_train_step(nano, "nanomind", ids, targets),
             "transformers": make_train_step(hf, "transformers", ids, targets)}
    if compiled:
        # The compiled module shares nanomind's parameters; its first step compiles, outside the timing.
        steps[COMPILED] = make_train_step(torch.compile(nano), "nanomind", ids, targets)
        t0 = time.perf_counter()
        steps[COMPILED]()
        log(f"  torch.compile of the {preset} training step: {time.perf_counter() - t0:.0f} s")
    log(f"train {preset}: batch {batch} x seq {seq}, {warmup} warm-up + {timed} timed steps each")
    timing = interleaved_timing(steps, warmup, timed, budget_s=budget_s)
    times = timing["times"]
    n_params = nano.num_parameters()
    result = TrainResult(preset, batch, seq, times, check, n_params,
                         train_flops_per_step(config, n_params, batch, seq),
                         timing["rounds"], timing["discarded"], timing["contended"])
    if preset == "base":
        result.matrix_s, result.matrix_share = matrix_seconds(steps["nanomind"])
        log(f"  nanomind: matrix products take {result.matrix_share:.0%} of a profiled step")
    if timing["discarded"]:
        log(f"  {timing['discarded']} of {timing['rounds']} rounds ran while other processes used the CPU"
            + (" (too few clean rounds: all counted)" if timing["contended"] else " (discarded)"))
    for k in times:
        log(f"  {k:12s} median {statistics.median(times[k]) * 1e3:8.1f} ms  "
            f"(min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})  "
            f"{result.tokens_per_s(k):9.0f} tok/s")
    del nano, hf, steps
    return result


# ----------------------------------------------------------------------------------------------
# Decode throughput


@dataclass
class DecodeResult:
    preset: str
    prompt_len: int
    new_tokens: int
    times: dict[str, list[float]]
    same_tokens: int
    rounds: int = 0
    discarded: int = 0
    contended: bool = False

    def tokens_per_s(self, kind: str) -> float:
        return self.new_tokens / statistics.median(self.times[kind])


def bench_decode(preset: str, prompt_len: int, new_tokens: int, warmup: int, timed: int, log,
                 budget_s: float | None = None) -> DecodeResult:
    config = preset_config(preset)
    nano, hf = build_pair(config)
    nano.eval().fuse_projections()  # as `nanomind generate`, `chat` and `serve` load a model
    hf.eval()
    g = torch.Generator().manual_seed(3)
    # Avoid the special ids so that neither side has a reason to treat a prompt token specially.
    prompt = torch.randint(3, config.vocab_size, (prompt_len,), generator=g).tolist()
    prompt_tensor = torch.tensor([prompt])
    params = SamplingParams(max_new_tokens=new_tokens)
    out = {}

    def run_nano():
        out["nanomind"] = [t[0] for t in decode_tokens(nano, [prompt], params)]

    def run_hf():
        with torch.inference_mode():
            seq = hf.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=config.pad_token_id)
        out["transformers"] = seq[0, prompt_len:].tolist()

    log(f"decode {preset}: prompt {prompt_len} tokens, {new_tokens} new tokens, batch 1")
    timing = interleaved_timing({"nanomind": run_nano, "transformers": run_hf}, warmup, timed,
                                budget_s=budget_s)
    times = timing["times"]
    if timing["discarded"]:
        log(f"  {timing['discarded']} of {timing['rounds']} rounds ran while other processes used the CPU"
            + (" (too few clean rounds: all counted)" if timing["contended"] else " (discarded)"))
    a, b = out["nanomind"], out["transformers"]
    if len(a) != new_tokens or len(b) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(a)} (nanomind), {len(b)} (transformers)")
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), new_tokens)
    result = DecodeResult(preset, prompt_len, new_tokens, times, same,
                          timing["rounds"], timing["discarded"], timing["contended"])
    for k in times:
        log(f"  {k:12s} median {statistics.median(times[k]) * 1e3:8.1f} ms  "
            f"(min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})  "
            f"{result.tokens_per_s(k):7.1f} tok/s")
    return result


# ----------------------------------------------------------------------------------------------
# Matmul peak


def matmul_rates(shapes: list[tuple[int, int, int]], reps: int, log) -> dict[tuple, list[float]]:
    """fp32 torch.mm throughput (FLOP/s) of each shape, `reps` timings each (~2 GFLOP per timing)."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        inner = max(1, int(2e9 // (2 * m * k * n)))
        rates[(m, k, n)] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            rates[(m, k, n)].append(2 * m * k * n * inner / (time.perf_counter() - t0))
        log(f"  mm {m}x{k} @ {k}x{n}: best {max(rates[(m, k, n)]) / 1e9:6.1f}, "
            f"median {statistics.median(rates[(m, k, n)]) / 1e9:6.1f} GFLOP/s")
    return rates


@dataclass
class Peak:
    rates: dict[tuple, list[float]]

    @property
    def best(self) -> float:
        """The peak: the best timing of any shape."""
        return max(max(v) for v in self.rates.values())

    @property
    def typical(self) -> float:
        """The median timing of the shape with the best median: what a sustained matmul gets."""
        return max(statistics.median(v) for v in self.rates.values())


# ----------------------------------------------------------------------------------------------
# Report


def machine_description() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "unknown"
    return {
        "CPU": cpu,
        "logical cores (os.cpu_count)": os.cpu_count(),
        "cores usable by this process": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?",
        "torch threads (intra-op)": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "ATen CPU capability": capability,
        "BLAS": "MKL" if torch.backends.mkl.is_available() else "other",
        "python": platform.python_version(),
        "load average at start (1/5/15 min)": _LOAD_AT_START,
        "OS": f"{platform.system()} {platform.release()}",
    }


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


_LOAD_AT_START = load_average()


def command_line() -> str:
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    try:
        niceness = os.nice(0)
    except OSError:
        niceness = 0
    return f"nice -n {niceness} {cmd}" if niceness else cmd


def verdict(value: float, target: float) -> str:
    return "yes" if value >= target else "**no**"


def render_table(train: list[TrainResult], decode: DecodeResult, peak: Peak) -> str:
    rows = ["| Benchmark | nanomind | transformers | nanomind / transformers | Target | Met |",
            "|---|---:|---:|---:|---|---|"]
    for r in train:
        a, b = r.tokens_per_s("nanomind"), r.tokens_per_s("transformers")
        target = TARGETS.get(f"train_{r.preset}")
        target_s, met = (f">= {target:.2f}x", verdict(a / b, target)) if target else ("-", "-")
        rows.append(f"| Train step `{r.preset}` (B={r.batch}, T={r.seq}), tokens/s | {a:,.0f} | {b:,.0f} "
                    f"| {a / b:.2f}x | {target_s} | {met} |")
    for r in train:
        flops = sum(r.flops)
        a = flops / statistics.median(r.times["nanomind"]) / peak.best * 100
        b = flops / statistics.median(r.times["transformers"]) / peak.best * 100
        if r.preset == "base":
            rows.append(f"| Train step `base` model FLOPs utilisation, % of measured fp32 matmul peak "
                        f"| {a:.1f}% | {b:.1f}% | {a / b:.2f}x | >= {TARGETS['mfu_base']:.0f}% (nanomind) "
                        f"| {verdict(a, TARGETS['mfu_base'])} |")
        if COMPILED in r.times:
            c = flops / statistics.median(r.times[COMPILED]) / peak.best * 100
            rows.append(f"| ... the same `{r.preset}` step under torch.compile (`--compile`; transformers eager) "
                        f"| {c:.1f}% | {b:.1f}% | {c / b:.2f}x | >= {TARGETS['mfu_base']:.0f}% (nanomind) "
                        f"| {verdict(c, TARGETS['mfu_base'])} |")
    a, b = decode.tokens_per_s("nanomind"), decode.tokens_per_s("transformers")
    rows.append(f"| Greedy decode `{decode.preset}`, batch 1 (prompt {decode.prompt_len}, "
                f"{decode.new_tokens} new), tokens/s | {a:,.1f} | {b:,.1f} | {a / b:.2f}x "
                f"| >= {TARGETS['decode_base']:.2f}x | {verdict(a / b, TARGETS['decode_base'])} |")
    rows.append(f"| fp32 matmul peak of this CPU (torch.mm, best timing), GFLOP/s | {peak.best / 1e9:.1f} "
                f"| | | | |")
    return "\n".join(rows)


def render_details(train: list[TrainResult], decode: DecodeResult, peak: Peak) -> str:
    lines = ["| Measurement | nanomind median (min-max) | transformers median (min-max) | timed rounds "
             "(clean / run) |", "|---|---|---|---:|"]

    def rounds(r):
        used = len(r.times["nanomind"])
        note = " (CPU shared: all rounds counted)" if r.contended else ""
        return f"{used} / {r.rounds}{note}"

    def span(ts):
        return f"{statistics.median(ts) * 1e3:,.1f} ms ({min(ts) * 1e3:,.1f}-{max(ts) * 1e3:,.1f})"

    for r in train:
        lines.append(f"| Train step `{r.preset}` B={r.batch} T={r.seq} ({r.n_params / 1e6:.2f}M params) "
                     f"| {span(r.times['nanomind'])} | {span(r.times['transformers'])} "
                     f"| {rounds(r)} |")
        if COMPILED in r.times:
            lines.append(f"| Train step `{r.preset}` under torch.compile (`--compile`) "
                         f"| {span(r.times[COMPILED])} | | {rounds(r)} |")
    lines.append(f"| Decode `{decode.preset}` {decode.new_tokens} tokens (incl. prefill) "
                 f"| {span(decode.times['nanomind'])} | {span(decode.times['transformers'])} "
                 f"| {rounds(decode)} |")
    lines.append("")
    lines.append(f"A round is one step of each implementation (order alternating); rounds during which "
                 f"other processes kept >= {CONTENDED_CORES} cores busy are rerun, not counted.")
    lines.append("")
    lines.append("Same function check (before timing; fp32): " + "; ".join(
        f"`{r.preset}` max |logit diff| {r.check['logit_diff']:.1e}, |loss diff| {r.check['loss_diff']:.1e}"
        for r in train) + f"; greedy decode: the first {decode.same_tokens} of {decode.new_tokens} "
        "tokens are identical.")
    lines.append("")
    lines.append("FLOPs per training step: 6 x params x tokens + 12 x layers x seq x head_dim x heads x "
                 "tokens / 2 (tied embedding counted once, as the lm_head matmul; attention halved "
                 "for the causal mask; forward + backward = 3x forward). " + "; ".join(
                     f"`{r.preset}`: {r.flops[0] / 1e9:,.1f} + {r.flops[1] / 1e9:,.1f} GFLOP"
                     for r in train) + ".")
    lines.append("")
    lines.append("fp32 matmul throughput, torch.mm, best / median of the timings per shape (GFLOP/s): "
                 + ", ".join(f"{m}x{k}@{k}x{n} {max(v) / 1e9:.1f} / {statistics.median(v) / 1e9:.1f}"
                             for (m, k, n), v in peak.rates.items())
                 + ". The peak is the best timing; the utilisation above is measured against it.")
    for r in train:
        if r.preset == "base":
            mfu = [sum(r.flops) / statistics.median(r.times[k]) / peak.typical * 100
                   for k in ("nanomind", "transformers")]
            lines.append("")
            lines.append(f"Against the typical (median) matmul rate, {peak.typical / 1e9:.1f} GFLOP/s, the "
                         f"`base` step reaches {mfu[0]:.1f}% (nanomind) and {mfu[1]:.1f}% (transformers).")
            if r.matrix_share:
                rate = sum(r.flops) / r.matrix_s / peak.best
                lines.append("")
                lines.append(f"Where nanomind's `base` step goes (torch.profiler, {PROFILED_STEPS} steps; its own overhead counts "
                             f"against the small ops): matrix products (matmuls and the attention kernels) take "
                             f"{r.matrix_share:.0%} of it and run at {rate:.0%} of the peak while they do; the other "
                             f"{1 - r.matrix_share:.0%} is elementwise work (SwiGLU, norms, rotary, residuals) and "
                             f"the optimizer. At that matmul rate, {TARGETS['mfu_base']:.0f}% of the peak needs the "
                             f"other work under {max(0.0, 1 - TARGETS['mfu_base'] / 100 / rate):.0%} of the step.")
    return "\n".join(lines)


def write_results(table: str, details: str, machine: dict, command: str, wall_s: float) -> None:
    machine_lines = "\n".join(f"| {k} | {v} |" for k, v in machine.items())
    section = f"""## Core model: nanomind vs transformers

nanomind vs transformers' `Qwen3ForCausalLM` (sdpa attention), side by side in one process:
same CPU and threads, fp32, same config, batch and weights (nanomind's state dict loaded into the
transformers model). Generated by `benchmarks/bench_core.py --write`, which rewrites this section only.

### Results

{table}

Ratios above 1 mean nanomind is faster. Training: forward + backward + AdamW step (the fused AdamW
kernel for both: nanomind's trainer uses it, and so does transformers' Trainer by default), median
of the timed steps after warm-up, the two implementations interleaved. nanomind is given targets
already shifted (loss over T positions per row; its loss goes through the LM head a chunk of rows
at a time, without materialising the logits); transformers is given labels = inputs and shifts them
itself (loss over T-1 positions): the same work to within one row of the cross-entropy.
The `--compile` row is the same nanomind model under `torch.compile` (inductor fuses the
elementwise work between the matmuls; its compile time, a minute or two, is not counted), timed in
the same rounds: it is what `nanomind pretrain --compile` trains with.

Decode: greedy, batch 1, time for all new tokens including the prompt's prefill; nanomind's model
is loaded as `nanomind generate` loads it (q/k/v and gate/up projections fused, see
`NanoMind.fuse_projections`), and its large projections multiply through oneDNN rather than MKL
outside autograd (`nanomind.model.linear`: on the AVX2 EPYC, MKL's few-row fp32 path read the weights
about 1.5x slower); transformers uses `generate(do_sample=False, min_new_tokens=N)` with its default
dynamic cache, and F.linear (MKL).

### Details

{details}

### Machine

| | |
|---|---|
{machine_lines}

### Command

```
{command}
```

Wall time of the run: {wall_s:.0f} s. The machine may be shared with other jobs: compare ratios
taken in one run rather than absolute numbers across runs.
"""
    replace_section(RESULTS_PATH, "## Core model", section)


def outcome_table(rows) -> list[str]:
    """Markdown lines of a table of (outcome, value, change, target, met: True / False / None)."""
    lines = ["| Outcome | Value | Change | Target | Met |", "|---|---:|---:|---|---|"]
    return lines + [f"| {a} | {b} | {c} | {d} | {'' if e is None else ('yes' if e else '**no**')} |"
                    for a, b, c, d, e in rows]


def publish_section(heading: str, section: str, write: bool) -> None:
    """Print a benchmark's RESULTS.md section; with --write, also put it in place of the old one."""
    print("\n" + section)
    if write:
        replace_section(RESULTS_PATH, heading, section)
        print(f"wrote {RESULTS_PATH}")


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put `section` in place of the one starting with `heading` (up to the next `## `) in
    RESULTS.md, leaving the other benchmarks' sections alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: short sequences, few steps")
    p.add_argument("--write", action="store_true", help=f"rewrite {RESULTS_PATH.name} with the results")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default 512)")
    p.add_argument("--tiny-batch", type=int, default=None, help="training batch for tiny (default 8)")
    p.add_argument("--base-batch", type=int, default=None, help="training batch for base (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per implementation")
    p.add_argument("--tiny-steps", type=int, default=None, help="timed steps per implementation, tiny")
    p.add_argument("--base-steps", type=int, default=None, help="timed steps per implementation, base")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 128)")
    p.add_argument("--decode-runs", type=int, default=None, help="timed decode runs per implementation")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile'd base training step (it compiles for a minute or two first)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time allowed for the timed rounds, retries included (default 9; --quick 1)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seq_len=128 if quick else 512, tiny_batch=2 if quick else 8, base_batch=1 if quick else 2,
                    warmup=1 if quick else 2, tiny_steps=2 if quick else 12, base_steps=2 if quick else 7,
                    prompt_len=8 if quick else 32, new_tokens=16 if quick else 128,
                    decode_runs=2 if quick else 5, max_minutes=1 if quick else 9)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("transformers is needed for the comparison: pip install 'nanomind[interop]'")
    import transformers.utils.logging as hf_logging
    hf_logging.set_verbosity_error()

    log("fp32 matmul peak")
    T = args.seq_len
    shapes = [(2048, 2048, 2048), (args.base_batch * T, 768, 2432), (args.base_batch * T, 2432, 768)]
    if args.quick:
        shapes = shapes[:1]
    rates = matmul_rates(shapes, reps=3 if args.quick else 8, log=log)

    budget = args.max_minutes * 60  # for the timed rounds; retries stop once a section's share is spent
    train = [bench_training("tiny", args.tiny_batch, T, args.warmup, args.tiny_steps, log, 0.2 * budget),
             bench_training("base", args.base_batch, T, args.warmup, args.base_steps, log, 0.5 * budget,
                            compiled=not args.no_compile)]
    decode = bench_decode("base", args.prompt_len, args.new_tokens, 1, args.decode_runs, log, 0.2 * budget)

    # A second look after the long runs (the machine's speed drifts); the peak is the best of all.
    log("fp32 matmul peak, again")
    for shape, more in matmul_rates(shapes, reps=3 if args.quick else 5, log=log).items():
        rates[shape] += more
    peak = Peak(rates)

    table = render_table(train, decode, peak)
    details = render_details(train, decode, peak)
    print(table)
    print()
    print(details)
    wall = time.perf_counter() - start
    log(f"done in {wall:.0f} s")
    if args.write:
        write_results(table, details, machine_description(), command_line(), wall)
        log(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
