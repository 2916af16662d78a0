"""HPSv2 / HPSv2.1 (Wu et al., 2023): an OpenCLIP ViT-H-14 fine-tuned on human preference pairs.

reward_i = cos(E_img(x_i), E_txt(p_i)) of the fine-tuned model (the diagonal of
`image_features @ text_features.T` in the reference `hpsv2` package; typical values 0.2–0.35).
Needs the optional extra `pip install "mixgrpo-ray[hpsv2]"` and the checkpoint in a local directory:
`<model_path>/HPS_v2.1_compressed.pt` (or `HPS_v2_compressed.pt` with version="v2.0"). The base
ViT-H-14 is built without pretrained weights (the checkpoint holds them all), and the OpenCLIP tokenizer
ships with the package, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reward_servers.scorers.base import ScorerLoadError, check_batch, require_dir
from services.devices import resolve_device

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
EXTRA = 'pip install "mixgrpo-ray[hpsv2]"'


class HPSv2:
    """Human Preference Score v2 from local weights via the `hpsv2` package."""

    name = "hpsv2"

    def __init__(self, model_path: str | None = None, version: str = "v2.1", device: str = "auto") -> None:
        device = str(resolve_device(device))
        if version not in CHECKPOINTS:
            raise ValueError(f"hpsv2: version must be one of {sorted(CHECKPOINTS)}, got {version!r}")
        ckpt = Path(require_dir(model_path, self.name, f"the HPS checkpoint {CHECKPOINTS[version]}"))
        ckpt = ckpt / CHECKPOINTS[version]
        if not ckpt.is_file():
            raise ScorerLoadError(f"hpsv2: checkpoint not found at {str(ckpt)!r} (download "
                                  f"{CHECKPOINTS[version]} from the xswu/HPSv2 model repo into model_path)")
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except ImportError as e:
            raise ScorerLoadError(f"hpsv2: the optional package is missing ({e}); install the extra with "
                                  f"{EXTRA} (weights expected at {str(ckpt)!r})") from e
        model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False)
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        self.model = model.eval()
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.device, self.version, self.ckpt = device, version, ckpt

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts: B strings -> (B,) float32 cosine similarities."""
        prompts = check_batch(images, prompts)
        pixels = torch.stack([self.preprocess(Image.fromarray(img)) for img in images]).to(self.device)
        out = self.model(pixels, self.tokenizer(prompts).to(self.device))
        return (out["image_features"] * out["text_features"]).sum(-1).float().cpu().numpy()

    def info(self) -> dict[str, object]:
        return {"architecture": "OpenCLIP ViT-H-14", "version": self.version, "checkpoint": self.ckpt.name}
