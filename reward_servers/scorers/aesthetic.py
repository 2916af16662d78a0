"""LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

reward_i = MLP(E_img(x_i) / ‖E_img(x_i)‖); the prompt is ignored. The head has the layout of
`improved-aesthetic-predictor` (`layers.{0,2,4,6,7}` = Linear 768→1024→128→64→16→1 with dropout 0.2,
0.2, 0.1 between the first ones), so its published state dict
(`sac+logos+ava1-l14-linearMSE.pth`) loads as is. The head file is read from `head_path`, default
`<model_path>/aesthetic_mlp.safetensors` (or `.pth`, loaded with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from reward_servers.scorers._clip import LocalClip
from reward_servers.scorers.base import ScorerLoadError, check_batch

HEAD_FILES = ("aesthetic_mlp.safetensors", "aesthetic_mlp.pth", "sac+logos+ava1-l14-linearMSE.pth")


class AestheticHead(nn.Module):
    """(B, D) normalised CLIP image embeddings -> (B, 1) aesthetic score (~1–10 for the LAION head)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_head(path: Path, input_dim: int) -> AestheticHead:
    """Read the head's state dict from .safetensors or .pth (no pickle code execution) and check shapes."""
    if not path.is_file():
        raise ScorerLoadError(f"aesthetic: head weights not found at {str(path)!r}; expected one of "
                              f"{HEAD_FILES} in model_path or an explicit head_path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        head = AestheticHead(input_dim)
        head.load_state_dict(state)
    except Exception as e:  # corrupted file, wrong keys or shapes: all the same to the operator
        raise ScorerLoadError(f"aesthetic: could not load the MLP head from {str(path)!r} for CLIP "
                              f"embedding size {input_dim}: {e}") from e
    return head.eval()


class Aesthetic:
    """Prompt-independent aesthetic quality from a local CLIP model plus the LAION MLP head."""

    name = "aesthetic"

    def __init__(self, model_path: str | None = None, head_path: str | None = None, device: str = "auto") -> None:
        self.clip = LocalClip(model_path, self.name, device)
        device = self.clip.device
        if head_path is None:
            found = [Path(model_path) / f for f in HEAD_FILES if (Path(model_path) / f).is_file()]
            head_path = str(found[0] if found else Path(model_path) / HEAD_FILES[0])
        self.head_path = head_path
        self.head = load_head(Path(head_path), self.clip.embed_dim).to(device)

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts checked but unused -> (B,) float32."""
        check_batch(images, prompts)
        emb = self.clip.image_embeds(images)  # (B, D), unit norm
        return self.head(emb)[:, 0].numpy().astype(np.float32)

    def info(self) -> dict[str, object]:
        return {**self.clip.info(), "head": Path(self.head_path).name}
