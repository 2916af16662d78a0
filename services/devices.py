"""Which device a role computes on: the accelerator Ray assigned to the actor, else the CPU.

Ray gives an actor with `num_gpus > 0` its GPUs through CUDA_VISIBLE_DEVICES, so inside it `cuda` is the
assigned device (cuda:0 of the visible ones), and an actor without GPUs sees none.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when this process can see a GPU, else cpu; "cpu" / "cuda" as asked ("cuda" without a
    visible GPU is an error: the role was given none, e.g. its `num_gpus` is 0)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but this process sees no GPU (does its role ask Ray for "
                               "num_gpus > 0, and does the node have one?)")
        return torch.device("cuda")
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
