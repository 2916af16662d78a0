"""The shapes world's rule verifier as a reward: partial-credit score in [0, 1] from pixels.

reward_i = shapes_world.verify(p_i, x_i).score, or the strict pass as 0/1 with strict=True. This is the
gold metric of the embedded task; training on it directly is the "oracle reward" baseline. With
extras_weight w != 1 each extra object counts w in the denominator, points / (max points + w * extras), a
harder price on the hedging that the partial score allows (the evaluation always scores w = 1).
"""

from __future__ import annotations

import numpy as np

from reward_servers.scorers.base import check_batch
from services import shapes_world


class ShapesVerifier:
    """Rule-based reward for 32×32 shapes-world images; ValueError for out-of-grammar prompts."""

    name = "shapes_verifier"

    def __init__(self, model_path: str | None = None, strict: bool = False, extras_weight: float = 1.0) -> None:
        if model_path is not None:
            raise ValueError(f"shapes_verifier is rule-based; model_path must not be set (got {model_path!r})")
        if not 0.0 <= float(extras_weight) <= 100.0:
            raise ValueError(f"shapes_verifier extras_weight must be in [0, 100], got {extras_weight!r}")
        if strict and float(extras_weight) != 1.0:
            raise ValueError("shapes_verifier: strict scores 0/1 and ignores extras_weight; set one of them")
        self.strict, self.extras_weight = bool(strict), float(extras_weight)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, 32, 32, 3) uint8; prompts: B shapes-grammar prompts -> (B,) float32 in [0, 1]."""
        size = shapes_world.IMAGE_SIZE
        prompts = check_batch(images, prompts, size=(size, size))
        for p in prompts:  # parse all first: one bad prompt fails the batch before any work
            shapes_world.parse(p)
        counts = [shapes_world.requirements(p, img) for p, img in zip(prompts, images, strict=True)]
        if self.strict:
            return np.array([float(r.verdict.strict) for r in counts], dtype=np.float32)
        return np.array([r.score(self.extras_weight) for r in counts], dtype=np.float32)

    def info(self) -> dict[str, object]:
        return {"architecture": "rule verifier (services.shapes_world.verify)", "strict": self.strict,
                "extras_weight": self.extras_weight, "image_size": shapes_world.IMAGE_SIZE}
