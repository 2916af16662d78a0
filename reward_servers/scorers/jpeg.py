"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al., 2023).

reward = size of the image encoded as JPEG at quality 95, in kB (1 kB = 1000 bytes, as in DDPO's
`buffer.tell() / 1000`); `jpeg_compressibility` negates it so that smaller files score higher.
Both live in this one file because they are one measurement with a sign.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from reward_servers.scorers.base import check_batch


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """image: (H, W, 3) uint8 -> size of its JPEG encoding in kB (PIL, 4:2:0 subsampling default)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegSize:
    """Signed JPEG size: sign=+1 rewards incompressible images, sign=-1 compressible ones."""

    def __init__(self, name: str, sign: float, quality: int = 95) -> None:
        if sign not in (1.0, -1.0):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.name = name
        self.sign = float(sign)
        self.quality = int(quality)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8; prompts are ignored -> (B,) float32 signed kB."""
        check_batch(images, prompts)
        sizes = [jpeg_size_kb(img, self.quality) for img in images]
        return (self.sign * np.asarray(sizes, dtype=np.float64)).astype(np.float32)

    def info(self) -> dict[str, object]:
        return {"architecture": "PIL JPEG encoder", "quality": self.quality, "sign": self.sign, "unit": "kB"}


def jpeg_compressibility(model_path: str | None = None, quality: int = 95) -> JpegSize:
    """-kB: smaller JPEG files score higher. Takes no weights (`model_path` must be None)."""
    _no_weights("jpeg_compressibility", model_path)
    return JpegSize("jpeg_compressibility", -1.0, quality)


def jpeg_incompressibility(model_path: str | None = None, quality: int = 95) -> JpegSize:
    """+kB: larger JPEG files score higher. Takes no weights (`model_path` must be None)."""
    _no_weights("jpeg_incompressibility", model_path)
    return JpegSize("jpeg_incompressibility", 1.0, quality)


def _no_weights(name: str, model_path: str | None) -> None:
    if model_path is not None:
        raise ValueError(f"{name} is weight-free; model_path must not be set (got {model_path!r})")
