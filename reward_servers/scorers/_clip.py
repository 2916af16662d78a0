"""Loading a CLIP model from a local directory and embedding images / prompts with it.

Shared by clip_score, pickscore and aesthetic (all three are a CLIPModel plus a little arithmetic).
Only local directories are read (`local_files_only=True`): nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reward_servers.scorers.base import ScorerLoadError, require_dir
from services.devices import resolve_device

CLIP_HINT = ("a CLIP model and its processor saved with save_pretrained "
             "(config.json, model.safetensors, tokenizer and preprocessor files)")


class LocalClip:
    """A transformers CLIPModel + processor loaded from `model_path`, in eval mode on `device`."""

    def __init__(self, model_path: str | None, scorer: str, device: str = "auto") -> None:
        from transformers import AutoProcessor, CLIPModel  # heavy import, deferred

        device = str(resolve_device(device))  # auto: the GPU Serve gave this replica (num_gpus > 0), else CPU
        path = require_dir(model_path, scorer, CLIP_HINT)
        if not (Path(path) / "config.json").is_file():
            raise ScorerLoadError(f"{scorer}: {path!r} has no config.json; expected {CLIP_HINT}")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ScorerLoadError(f"{scorer}: could not load a CLIP model from {path!r} ({e}); "
                                  f"expected {CLIP_HINT}") from e
        self.device = device
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self.embed_dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """images: (B, H, W, 3) uint8 -> (B, D) L2-normalised projected image embeddings, fp32."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x vs 5.x
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """prompts: B strings -> (B, D) L2-normalised projected text embeddings, fp32 (truncated)."""
        tok = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_text_len)
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def logit_scale(self) -> float:
        """exp(learned logit scale), ~100 for trained CLIP models."""
        return float(self.model.logit_scale.detach().exp())

    def info(self) -> dict[str, object]:
        """Model description for /v1/rewards."""
        return {"architecture": "CLIPModel", "projection_dim": self.embed_dim,
                "image_size": int(self.model.config.vision_config.image_size),
                "params": sum(p.numel() for p in self.model.parameters())}
