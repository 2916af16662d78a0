"""CLIP score: 100 × cosine similarity of a CLIP model's image and prompt embeddings.

reward_i = scale · cos(E_img(x_i), E_txt(p_i)), scale = 100 by default (the torchmetrics / Hessel et al.
convention), or the model's own exp(logit_scale) with `scale="logit_scale"`. Unlike torchmetrics we do not
clamp negative similarities to 0: for RL a negative reward still carries a useful ordering.
"""

from __future__ import annotations

import numpy as np

from reward_servers.scorers._clip import LocalClip
from reward_servers.scorers.base import check_batch


class ClipScore:
    """Prompt–image alignment under a local CLIP model (e.g. openai/clip-vit-large-patch14)."""

    name = "clip_score"

    def __init__(self, model_path: str | None = None, scale: float | str = 100.0, device: str = "auto") -> None:
        if not (scale == "logit_scale" or (isinstance(scale, int | float) and scale > 0)):
            raise ValueError(f"clip_score: scale must be a positive number or 'logit_scale', got {scale!r}")
        self.clip = LocalClip(model_path, self.name, device)
        self.scale = self.clip.logit_scale() if scale == "logit_scale" else float(scale)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts: B strings -> (B,) float32 in [-scale, scale]."""
        prompts = check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)  # (B,)
        return (self.scale * cos).numpy().astype(np.float32)

    def info(self) -> dict[str, object]:
        return {**self.clip.info(), "scale": self.scale}
