"""ImageReward (Xu et al., 2023): a BLIP-based reward model trained on expert preference rankings.

reward_i = ImageReward(p_i, x_i), the model's standardised score (mean 0, std 1 over its training set).
Needs the optional extra `pip install "mixgrpo-ray[imagereward]"` and a local directory holding
`ImageReward.pt` and `med_config.json`. The package's BLIP text encoder also loads the
`bert-base-uncased` tokenizer through transformers: it must already be in the local Hugging Face cache;
we set HF_HUB_OFFLINE=1 so a missing file is an error, never a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reward_servers.scorers.base import ScorerLoadError, check_batch, require_dir
from services.devices import resolve_device

FILES = ("ImageReward.pt", "med_config.json")
EXTRA = 'pip install "mixgrpo-ray[imagereward]"'


class ImageReward:
    """ImageReward-v1.0 from local weights via the `image-reward` package (import name `ImageReward`)."""

    name = "imagereward"

    def __init__(self, model_path: str | None = None, device: str = "auto") -> None:
        device = str(resolve_device(device))
        root = Path(require_dir(model_path, self.name, f"{' and '.join(FILES)}"))
        missing = [f for f in FILES if not (root / f).is_file()]
        if missing:
            raise ScorerLoadError(f"imagereward: {missing} not found in {str(root)!r} (download them from "
                                  f"the THUDM/ImageReward model repo into model_path)")
        try:
            import ImageReward as reward_lib
        except ImportError as e:
            raise ScorerLoadError(f"imagereward: the optional package is missing ({e}); install the extra "
                                  f"with {EXTRA} (weights expected in {str(root)!r})") from e
        os.environ["HF_HUB_OFFLINE"] = "1"
        self.model = reward_lib.load(str(root / FILES[0]), device=device, download_root=str(root),
                                     med_config=str(root / FILES[1])).eval()
        self.root = root

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts: B strings -> (B,) float32 (one model call per prompt)."""
        prompts = check_batch(images, prompts)
        out = np.empty(len(prompts), dtype=np.float32)
        for prompt in dict.fromkeys(prompts):  # the package scores one prompt against a list of images
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            scores = self.model.score(prompt, [Image.fromarray(images[i]) for i in idx])
            out[idx] = np.atleast_1d(np.asarray(scores, dtype=np.float32))
        return out

    def info(self) -> dict[str, object]:
        return {"architecture": "BLIP + MLP (ImageReward-v1.0)", "path": str(self.root)}
