"""The learned shapes reward model (shapes_reward_model.py, beside this file) as a scorer.

reward_i = sigmoid(ShapesRewardModel(x_i, p_i)) in [0, 1], an approximation of the rule verifier's
score trained on rendered and corrupted images. Weights: `model_path`, default the checkpoint shipped in
reward_servers/assets/shapes_reward (rebuilt by `python -m learner.tools.pretrain reward --out ...`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reward_servers.scorers import shapes_reward_model
from reward_servers.scorers.base import ScorerLoadError, check_batch
from services import shapes_world

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "assets" / "shapes_reward"


class ShapesReward:
    """Learned image-text reward for 32×32 shapes-world images; ValueError for out-of-grammar prompts."""

    name = "shapes_reward"

    def __init__(self, model_path: str | None = None) -> None:
        self.path = Path(model_path) if model_path is not None else DEFAULT_PATH
        try:
            self.model = shapes_reward_model.load(self.path)
        except (FileNotFoundError, ValueError) as e:
            raise ScorerLoadError(f"shapes_reward: {e}") from e

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, 32, 32, 3) uint8; prompts: B shapes-grammar prompts -> (B,) float32 in [0, 1]."""
        size = shapes_world.IMAGE_SIZE
        prompts = check_batch(images, prompts, size=(size, size))
        for p in prompts:  # the model would score any in-vocabulary word soup; the grammar is the contract
            shapes_world.parse(p)
        return self.model.score(images, prompts)

    def info(self) -> dict[str, object]:
        return {"architecture": "ShapesRewardModel (FiLM CNN + word transformer)", "path": str(self.path),
                "params": sum(p.numel() for p in self.model.parameters())}
