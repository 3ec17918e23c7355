"""Pretraining: next-token prediction on documents packed into full rows (no padding).

  nanomind pretrain --data pretrain.jsonl --tokenizer tok/ --preset small --out runs/pretrain
"""

from .trainer import Stage, run_stage, token_loss

SAMPLE_PROMPTS = ["The colour of grass is", "3 plus 4 equals", "北京是", "Once upon a time"]


def main(args) -> dict:
    return run_stage(args, "pretrain", lambda inputs: Stage(
        "pretrain", inputs.train_rows, inputs.val_rows, token_loss, sample_prompts=SAMPLE_PROMPTS))
