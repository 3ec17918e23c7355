import pytest
import torch

from nanomind.model import ModelConfig, NanoMind


def tiny_config(moe: bool = False, **overrides) -> ModelConfig:
    """A few-hundred-thousand-parameter model: every code path, milliseconds per forward."""
    values = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=160)
    if moe:
        values.update(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=96)
    values.update(overrides)
    return ModelConfig(**values)


def random_model(config: ModelConfig, seed: int = 0) -> NanoMind:
    """Random weights with norms perturbed away from 1, so a mix-up of norm weights shows in the logits."""
    torch.manual_seed(seed)
    model = NanoMind(config, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(3.0)  # sharper distributions than init, so greedy decoding is not a near-tie
    return model.eval()


@pytest.fixture
def dense_model():
    return random_model(tiny_config())


@pytest.fixture
def moe_model():
    return random_model(tiny_config(moe=True))
