"""Fetching MiniMind's published dataset files from the Hugging Face hub (resumable).

Only needed to train at real scale; the built-in curriculum (`nanomind data synth`) is the offline
default. Uses `huggingface_hub`, which comes with transformers (`pip install huggingface_hub`).
"""

from __future__ import annotations

from pathlib import Path

MINIMIND_DATASET_REPO = "jingyaogong/minimind_dataset"
# File name -> what it is for (sizes as MiniMind's README gives them).
MINIMIND_FILES = {
    "pretrain_t2t_mini.jsonl": "pretraining, 1.2 GB (the default)",
    "pretrain_t2t.jsonl": "full pretraining, 10 GB",
    "sft_t2t_mini.jsonl": "SFT / distillation, 1.6 GB (the default)",
    "sft_t2t.jsonl": "full SFT, 14 GB",
    "dpo.jsonl": "DPO pairs, 53 MB",
    "rlaif.jsonl": "RL prompts (PPO / GRPO / CISPO), 24 MB",
    "agent_rl.jsonl": "agent RL with tools, 86 MB",
    "agent_rl_math.jsonl": "agent RL, math only, 18 MB",
    "lora_medical.jsonl": "LoRA domain set (medical)",
    "lora_identity.jsonl": "LoRA identity set",
}


def download(name: str, out_dir: str | Path, repo: str = MINIMIND_DATASET_REPO) -> Path:
    """Download one file of the dataset repo into out_dir; an interrupted download resumes."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RuntimeError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    if name not in MINIMIND_FILES:
        known = "\n  ".join(f"{k}: {v}" for k, v in MINIMIND_FILES.items())
        raise ValueError(f"unknown dataset file {name!r}; MiniMind publishes:\n  {known}")
    try:
        return Path(hf_hub_download(repo_id=repo, filename=name, repo_type="dataset", local_dir=str(out_dir)))
    except Exception as e:  # network errors come in many types (requests, httpx, hub's own)
        raise RuntimeError(
            f"could not download {name} from the Hugging Face hub ({repo}): {type(e).__name__}: {e}\n"
            "This machine may have no network access. Download the file elsewhere and copy it here, "
            "or use the built-in curriculum: nanomind data synth --out DIR") from None
