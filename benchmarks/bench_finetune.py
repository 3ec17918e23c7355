"""Outcomes of the fine-tuning stages (LoRA, DPO, distillation) on the built-in curriculum.

One run on this machine, with the same commands a user types (each is printed):
  base      data synth (small) -> tokenizer -> pretrain `tiny` -> more pretraining on the medium
            curriculum's text (the same world) -> SFT: the model the stages start from
  LoRA      on lora_domain.jsonl, alone and mixed with as many general SFT conversations (replay):
            held-out domain loss gain, and the change of the general held-out SFT loss (forgetting)
  DPO       on dpo.jsonl: held-out preference accuracy (eval_dpo.jsonl) before and after (target >= 80%),
            and steps/s with the live reference vs --precompute-ref
  distill   a smaller student trained by plain SFT and by distillation from the SFT model, same steps,
            seed and initialisation: the share of the teacher-student validation-loss gap that
            distillation closes compared with plain SFT (target >= 50%). On the same data: the default
            student (hidden 64, 2 layers, all of sft.jsonl), a data-limited one (hidden 128, 2 layers,
            the first 200 conversations, many epochs), and the default student pretrained on the
            teacher's pretraining text first, as MiniMind does. Then where distillation is used in
            practice: the student has the first 200 conversations, and the teacher answers the other
            prompts (`nanomind generate --data`) for the distilled one, which learns the teacher's
            distributions on both; the pretrained student, and one made of the teacher's first and last
            layers (`nanomind convert --keep-layers 0,3`)

  python benchmarks/bench_finetune.py [--quick] [--write] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench_core import RESULTS_PATH, outcome_table, publish_section
from nanomind.checkpoint import load_model
from nanomind.demo import run_command, split_conversations, write_replay_mix
from nanomind.evaluation import held_out_loss, preference_accuracy
from nanomind.lora import load_adapter
from nanomind.tokenizer import Tokenizer

STUDENT = ["--preset", "tiny", "--hidden-size", "64", "--num-layers", "2", "--head-dim", "16",
           "--intermediate-size", "192"]
# The data-limited setting: a student as wide as the teacher (half its layers) that sees only the first
# FEW_CONVERSATIONS of sft.jsonl (the teacher saw all of them), for steps['distill_few'] (about 33 epochs).
FEW_STUDENT = ["--preset", "tiny", "--hidden-size", "128", "--num-layers", "2", "--head-dim", "32",
               "--intermediate-size", "384"]
FEW_CONVERSATIONS = 200
HALF_DEPTH_LAYERS = "0,3"  # of the teacher's four: the first and last layers matter most
DISTILL_FLAGS = ["--alpha", "0.5", "--temperature", "1.0"]  # the default setting's, as in the demo
FEW_DISTILL_FLAGS = ["--alpha", "0.0", "--temperature", "1.0"]  # the best measured in the data-limited one


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def steps_per_s(run: Path) -> float:
    """Median optimizer steps per second (the first steps, with warm-up effects, left out)."""
    rows = metrics(run)[3:]
    return float(np.median([r["tokens_per_s"] / r["tokens"] for r in rows if r["tokens"]]))


def train(argv: list[str], out: Path) -> Path:
    if not (out / "metrics.jsonl").exists() or not any((out / n).exists() for n in ("model", "adapter")):
        run_command(argv + ["--out", str(out), "--eval-every", "1000000", "--device", "cpu"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny curriculum, few steps")
    p.add_argument("--write", action="store_true", help=f"replace the '## Fine-tuning' section of {RESULTS_PATH.name}")
    p.add_argument("--work", type=Path, default=Path("/tmp/nanomind-bench-finetune"),
                   help="working folder (finished runs in it are reused)")
    args = p.parse_args()
    steps = ({"pretrain": 30, "pretrain_more": 10, "sft": 20, "lora": 10, "dpo": 10, "distill": 20, "distill_few": 20,
              "distill_half_depth": 20} if args.quick else
             {"pretrain": 800, "pretrain_more": 800, "sft": 400, "lora": 150, "dpo": 150, "distill": 400, "distill_few": 200,
              "distill_half_depth": 200})
    work, started = args.work, time.perf_counter()
    data, tok = work / "data", work / "tokenizer"
    if not (data / "manifest.json").exists():
        run_command(["data", "synth", "--out", str(data), "--size", "tiny" if args.quick else "small"])
    if not (tok / "tokenizer.json").exists():
        run_command(["tokenizer", "train", "--data", str(data / "pretrain.jsonl"), str(data / "sft.jsonl"),
                     "--vocab-size", "2048", "--out", str(tok)])
    # A second pass on fresh text about the same world: the larger curriculum nests the smaller one (same
    # people, towns and held-out items), and reading new sentences, not the same ones again, is what
    # teaches a model this small to compute and copy numbers, which the RL stages then sharpen.
    more = work / "data-more"
    if not (more / "manifest.json").exists():
        run_command(["data", "synth", "--out", str(more), "--size", "small" if args.quick else "medium",
                     "--files", "pretrain"])

    def pretrain_twice(model_flags: list[str], name: str) -> Path:
        """Pretraining on the curriculum's text, then on the larger one's: the folder of the second pass."""
        flags = ["--seq-len", "256", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "20"]
        first = train(["pretrain", "--data", str(data / "pretrain.jsonl"), "--tokenizer", str(tok), *model_flags,
                       *flags, "--max-steps", str(steps["pretrain"])], work / name)
        return train(["pretrain", "--data", str(more / "pretrain.jsonl"), "--init-from", str(first / "model"),
                      *flags, "--max-steps", str(steps["pretrain_more"])], work / f"{name}-more")

    pretrain = pretrain_twice(["--preset", "tiny"], "pretrain")
    sft = train(["sft", "--data", str(data / "sft.jsonl"), "--init-from", str(pretrain / "model"), "--seq-len", "768",
                 "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "10", "--max-steps", str(steps["sft"])],
                work / "sft") / "model"
    tokenizer = Tokenizer.load(sft)

    def sft_loss(model, file: str) -> float:
        return held_out_loss(model, tokenizer, sft, [data / file], seq_len=768)["loss"]

    # LoRA on the domain set, alone and mixed one to one with general conversations (replay, the usual
    # remedy for forgetting: the adapter keeps seeing what the base already does well)
    replay = write_replay_mix(data / "lora_domain.jsonl", data / "sft.jsonl", work / "lora_domain_and_replay.jsonl")
    base_model = load_model(sft)
    lora_result = {}
    for name, lora_data in (("", data / "lora_domain.jsonl"), ("-replay", replay)):
        lora = train(["lora", "--data", str(lora_data), "--init-from", str(sft), "--seq-len", "768",
                      "--batch-size", "8", "--lr", "1e-3", "--rank", "8", "--alpha", "16", "--warmup-steps", "10",
                      "--max-steps", str(steps["lora"])], work / f"lora{name}")
        tuned = load_adapter(load_model(sft), lora / "adapter")
        lora_result[name] = {kind: (sft_loss(base_model, file), sft_loss(tuned, file))
                             for kind, file in (("domain", "eval_lora_domain.jsonl"), ("general", "eval_sft.jsonl"))}

    # DPO, with the live and the precomputed reference (same steps, same seed)
    dpo_common = ["dpo", "--data", str(data / "dpo.jsonl"), "--init-from", str(sft), "--seq-len", "256",
                  "--batch-size", "8", "--lr", "1e-4", "--beta", "0.1", "--warmup-steps", "10",
                  "--max-steps", str(steps["dpo"])]
    dpo_live = train(dpo_common, work / "dpo-live")
    dpo_pre = train(dpo_common + ["--precompute-ref"], work / "dpo-precomputed")
    eval_dpo = [data / "eval_dpo.jsonl"]
    preference = {"before": preference_accuracy(base_model, tokenizer, sft, eval_dpo, seq_len=256),
                  "after": preference_accuracy(load_model(dpo_pre / "model"), tokenizer, sft, eval_dpo, seq_len=256),
                  "reward_after": preference_accuracy(load_model(dpo_pre / "model"), tokenizer, sft, eval_dpo,
                                                      seq_len=256, reference=base_model)}

    # Distillation of a smaller student from the SFT model, against plain SFT of the same student
    teacher_loss = sft_loss(base_model, "eval_sft.jsonl")

    def distillation(name: str, student: list[str], data_file: Path, steps: int, flags: list[str],
                     teacher_answers: Path | None = None, lr: str = "3e-3") -> tuple[float, float, float]:
        """(plain-SFT loss, distilled loss, share of the gap closed) on eval_sft, same steps, seed and
        initialisation. `student` is a fresh model's flags or ["--init-from", CHECKPOINT]. Plain SFT trains
        on `data_file`; distillation on it too, and on `teacher_answers` (the teacher's answers to more
        prompts) when given."""
        if student[0] != "--init-from":
            student = ["--tokenizer", str(tok), *student]
        common = [*student, "--seq-len", "768", "--batch-size", "8", "--lr", lr, "--warmup-steps", "10",
                  "--max-steps", str(steps)]
        plain = train(["sft", "--data", str(data_file), *common], work / f"student{name}-sft")
        distill_data = [str(data_file)] + ([str(teacher_answers)] if teacher_answers else [])
        distilled = train(["distill", "--data", *distill_data, "--teacher", str(sft), *flags, *common],
                          work / f"student{name}-distill")
        plain_loss = sft_loss(load_model(plain / "model"), "eval_sft.jsonl")
        distilled_loss = sft_loss(load_model(distilled / "model"), "eval_sft.jsonl")
        closed = (plain_loss - distilled_loss) / (plain_loss - teacher_loss) if plain_loss > teacher_loss else float("nan")
        return plain_loss, distilled_loss, closed

    # MiniMind's own setup: the student is pretrained on the teacher's pretraining text first (both passes),
    # so that the held-out facts are in its weights too and the gap left is the SFT stage's.
    student_pretrain = pretrain_twice(STUDENT, "student-pretrain")
    # The few conversations a data-limited student has, and the prompts of the others, which the teacher
    # answers for it (black-box; distillation then also learns the teacher's distributions on them).
    few, rest = split_conversations(data / "sft.jsonl", work / "distill-data", FEW_CONVERSATIONS, 10 ** 9)
    answers = work / "teacher-answers.jsonl"
    if not answers.exists():
        run_command(["generate", "--model", str(sft), "--data", str(rest), "--out", str(answers), "--think",
                     "--batch-size", "64", "--max-new-tokens", "160", "--device", "cpu"])
    half_depth = work / "student-half-depth"
    if not (half_depth / "config.json").exists():
        run_command(["convert", str(sft), "--out", str(half_depth), "--keep-layers", HALF_DEPTH_LAYERS])
    distill_rows = {
        "all of sft.jsonl, hidden 64, alpha 0.5": distillation("", STUDENT, data / "sft.jsonl", steps["distill"],
                                                               DISTILL_FLAGS),
        f"first {FEW_CONVERSATIONS} conversations, hidden 128, alpha 0": distillation(
            "-few", FEW_STUDENT, few, steps["distill_few"], FEW_DISTILL_FLAGS),
        "all of sft.jsonl, hidden 64 pretrained like the teacher, alpha 0.5": distillation(
            "-pretrained", ["--init-from", str(student_pretrain / "model")], data / "sft.jsonl", steps["distill"],
            DISTILL_FLAGS),
        f"first {FEW_CONVERSATIONS} conversations + the teacher's answers to the other prompts, hidden 64 "
        "pretrained like the teacher, alpha 0.5": distillation(
            "-pretrained-answers", ["--init-from", str(student_pretrain / "model")], few, steps["distill"],
            DISTILL_FLAGS, teacher_answers=answers),
        f"first {FEW_CONVERSATIONS} conversations + the teacher's answers to the other prompts, the teacher's "
        f"layers {HALF_DEPTH_LAYERS}, alpha 0.5": distillation(
            "-half-depth-answers", ["--init-from", str(half_depth)], few, steps["distill_half_depth"],
            DISTILL_FLAGS, teacher_answers=answers, lr="1e-3")}

    live, pre = steps_per_s(dpo_live), steps_per_s(dpo_pre)
    lora_rows = []
    for name, label in (("", "domain set only"), ("-replay", "domain set + as many general conversations")):
        (d0, d1), (g0, g1) = lora_result[name]["domain"], lora_result[name]["general"]
        lora_rows += [
            (f"LoRA ({label}): domain held-out loss (eval_lora_domain)", f"{d0:.3f} -> {d1:.3f}",
             f"{d0 - d1:+.3f} gain", "a gain", d1 < d0),
            (f"LoRA ({label}): general held-out loss (eval_sft), forgetting", f"{g0:.3f} -> {g1:.3f}",
             f"{g1 - g0:+.3f}", "< +0.1 (the demo's)", g1 - g0 < 0.1)]
    rows = [
        *lora_rows,
        ("DPO: held-out preference accuracy (log-prob of chosen > rejected)",
         f"{preference['before']['accuracy']:.1%} -> {preference['after']['accuracy']:.1%}", "",
         ">= 80% after", preference["after"]["accuracy"] >= 0.8),
        ("DPO: held-out reward accuracy (vs the SFT reference)", f"{preference['reward_after']['accuracy']:.1%}", "", "", None),
        ("DPO steps/s: live reference vs --precompute-ref", f"{live:.2f} vs {pre:.2f}", f"{pre / live:.2f}x", "", None),
        *((f"Distillation ({setting}): eval_sft loss teacher / plain-SFT student / distilled student",
           f"{teacher_loss:.3f} / {plain_loss:.3f} / {distilled_loss:.3f}", f"{closed:.0%} of the gap closed",
           ">= 50%", closed >= 0.5) for setting, (plain_loss, distilled_loss, closed) in distill_rows.items()),
    ]
    table = outcome_table(rows)
    elapsed = time.perf_counter() - started
    section = "\n".join([
        "## Fine-tuning: LoRA, DPO, distillation", "",
        f"On the built-in curriculum ({'tiny' if args.quick else 'small'}), CPU, one run "
        f"({elapsed / 60:.0f} min; runs already finished in its --work folder are reused): "
        f"`python benchmarks/bench_finetune.py{' --quick' if args.quick else ''} --write`. "
        f"Tokenizer: 2048 tokens, Qwen2's splitting (one token per digit). "
        f"Base: `tiny` preset, {steps['pretrain']} pretraining steps on the curriculum's text, "
        f"{steps['pretrain_more']} more on the larger curriculum's (same world, fresh sentences), then "
        f"{steps['sft']} SFT steps. LoRA r=8 for "
        f"{steps['lora']} steps (lr 1e-3); DPO sigmoid beta 0.1 for {steps['dpo']} steps. Each student is trained "
        f"from the same initialisation by SFT and by forward-KL distillation from the SFT model, for the same "
        f"steps: hidden 64, 2 layers, on all of sft.jsonl, {steps['distill']} steps; hidden 128, 2 layers, on its "
        f"first {FEW_CONVERSATIONS} conversations, {steps['distill_few']} steps ({' '.join(FEW_DISTILL_FLAGS)}); "
        f"hidden 64 pretrained first on both pretraining texts for as many steps as the teacher, "
        f"{steps['distill']} steps (all lr 3e-3). With the teacher's answers: plain SFT on the first "
        f"{FEW_CONVERSATIONS} conversations, distillation on them and on the teacher's greedy answers to the "
        f"prompts of the other {len(rest.read_text(encoding='utf-8').splitlines())}; the pretrained hidden-64 "
        f"student ({steps['distill']} steps, lr 3e-3) and the teacher's layers {HALF_DEPTH_LAYERS} "
        f"({steps['distill_half_depth']} steps, lr 1e-3). Distillation flags {' '.join(DISTILL_FLAGS)} unless "
        f"stated.", "", *table, ""])
    publish_section("## Fine-tuning", section, args.write)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
