"""The one scorer protocol, and the input checks every scorer runs at its boundary.

A scorer is a plain class (no Ray, no Serve): construct it, then call `score` on a batch.

    scorer = build_scorer("jpeg_compressibility")
    rewards = scorer.score(images, prompts)   # images (B, H, W, 3) uint8, prompts [B] -> (B,) float32

Contract: deterministic (same inputs, same outputs), no autograd graph, and `ValueError` with a message
naming the problem for inputs it cannot score (wrong shape/dtype, out-of-grammar prompt, ...). The Serve
layer turns that ValueError into a 422 for the one request that caused it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Scorer(Protocol):
    """Scores a batch of images against their prompts; higher is better."""

    name: str
    """Registry key, e.g. "shapes_reward"."""

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts: B strings -> (B,) float32 rewards."""
        ...

    def info(self) -> dict[str, object]:
        """JSON-able description of the model behind the scorer (shown by GET /v1/rewards)."""
        ...


def check_batch(
    images: np.ndarray,
    prompts: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
) -> list[str]:
    """Validate a scorer's inputs and return the prompts as a list.

    images: (B, H, W, 3) uint8 with B >= 1; prompts: B strings. `size` = (H, W) if the scorer needs one.
    Raises ValueError naming the first problem found.
    """
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3) with 3 RGB channels, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("empty batch: at least one image is needed")
    if size is not None and tuple(images.shape[1:3]) != tuple(size):
        raise ValueError(f"images must be {size[0]}x{size[1]} pixels for this scorer, got "
                         f"{images.shape[1]}x{images.shape[2]}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; counts must match")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


class ScorerLoadError(RuntimeError):
    """A scorer cannot be constructed: weights missing or corrupted, or an optional package absent.

    The message names what is missing and how to provide it (the expected local path, the pip extra).
    """


def require_dir(path: str | None, scorer: str, hint: str) -> str:
    """Return `path` if it is an existing local directory, else raise ScorerLoadError naming it.

    `hint` says what the directory should hold, e.g. "a CLIP model saved with save_pretrained".
    """
    if path is None:
        raise ScorerLoadError(f"{scorer} needs model_path: a local directory with {hint}")
    if not os.path.isdir(path):
        raise ScorerLoadError(f"{scorer}: model_path {path!r} does not exist or is not a directory; "
                              f"expected {hint} (models are never downloaded)")
    return path
