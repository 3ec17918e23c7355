"""`python -m nanomind ...` is the `nanomind` command (torchrun -m nanomind pretrain ... uses this)."""

from .cli import main

main()
