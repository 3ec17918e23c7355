"""Supervised fine-tuning: the same next-token loss, on chat-templated conversations, counted on
the assistant's tokens only (reasoning, answer, tool calls and the end-of-turn token).

  nanomind sft --data sft.jsonl --init-from runs/pretrain/model --out runs/sft
"""

from .trainer import Stage, run_stage, token_loss

SAMPLE_PROMPTS = ["What is 3 plus 4?", "你好，你是谁？", "What colour is the sky?"]


def main(args) -> dict:
    return run_stage(args, "sft", lambda inputs: Stage(
        "sft", inputs.train_rows, inputs.val_rows, token_loss, sample_prompts=SAMPLE_PROMPTS, chat_samples=True))
