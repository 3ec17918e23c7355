"""nanomind: train a small chat language model from scratch, in plain PyTorch."""

__version__ = "0.1.0"
