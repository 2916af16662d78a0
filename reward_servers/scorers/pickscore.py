"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on human preferences (Pick-a-Pic).

reward_i = exp(logit_scale) · cos(E_img(x_i), E_txt(p_i)), exactly the diagonal of CLIP's
`logits_per_image`, as in the PickScore reference code. Typical values are ~18–24; with
`normalize=True` the reward is (s − 18) / 8, the normalisation used when training with it, which maps
the usual range to about [0, 0.75].
"""

from __future__ import annotations

import numpy as np

from reward_servers.scorers._clip import LocalClip
from reward_servers.scorers.base import check_batch

PICKSCORE_OFFSET = 18.0
PICKSCORE_SCALE = 8.0


class PickScore:
    """Human-preference reward from a local PickScore_v1 checkpoint (a CLIPModel + CLIPProcessor)."""

    name = "pickscore"

    def __init__(self, model_path: str | None = None, normalize: bool = False, device: str = "auto") -> None:
        self.clip = LocalClip(model_path, self.name, device)
        self.normalize = bool(normalize)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts: B strings -> (B,) float32."""
        prompts = check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)  # (B,)
        s = self.clip.logit_scale() * cos
        if self.normalize:
            s = (s - PICKSCORE_OFFSET) / PICKSCORE_SCALE
        return s.numpy().astype(np.float32)

    def info(self) -> dict[str, object]:
        return {**self.clip.info(), "normalize": self.normalize}
