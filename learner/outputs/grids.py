"""Sample grids of the held-out evaluation: one PNG per evaluation plus a JSON sidecar with its prompts.

    <run>/samples/iter_000019.png   # the grid after iteration 19 (0-based, like checkpoints/iter_000019)
    <run>/samples/iter_000019.json  # {"iteration", "prompts", "scores", "rows", "cols", "scale"}
    <run>/samples/iter_base.png     # before training (iteration -1)

The cells are the first k held-out prompts with seed-fixed noise, so cell i shows the same prompt from
the same starting noise in every grid: comparing grids over time shows what training changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES_DIR = "samples"
PAD = 2  # pixels between cells (before upscaling)
PAD_VALUE = 64  # dark grey, distinguishable from the shapes world's black background


def grid_name(iteration: int) -> str:
    """`iter_base` before training (iteration -1), else `iter_XXXXXX` like the checkpoint folders."""
    return "iter_base" if iteration < 0 else f"iter_{iteration:06d}"


def make_grid(images: np.ndarray, cols: int | None = None, scale: int = 1) -> np.ndarray:
    """images (k, H, W, 3) uint8 → one (rows·(H+pad)−pad, cols·(W+pad)−pad, 3)·scale uint8 grid, row-major."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
        raise ValueError(f"images must be a non-empty (k, H, W, 3) uint8 array, got {images.shape} {images.dtype}")
    k, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = np.full((rows * (h + PAD) - PAD, cols * (w + PAD) - PAD, 3), PAD_VALUE, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + PAD):r * (h + PAD) + h, c * (w + PAD):c * (w + PAD) + w] = img
    if scale > 1:  # nearest neighbour: 32×32 cells stay crisp
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def default_scale(image_size: int, target: int = 128) -> int:
    """Upscale small cells (the tiny model's 32 px) to about `target` px; real models' images stay 1:1."""
    return max(1, target // image_size)


def save_grid(run_dir: str | Path, iteration: int, images: np.ndarray, prompts: Sequence[str],
              scores: Sequence[float] | None = None) -> str:
    """Write samples/<grid_name>.png and .json under `run_dir`; returns the PNG path relative to `run_dir`."""
    if len(prompts) != len(images):
        raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(images)} images")
    out = Path(run_dir) / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    scale = default_scale(images.shape[1])
    cols = math.ceil(math.sqrt(len(images)))
    name = grid_name(iteration)
    Image.fromarray(make_grid(images, cols, scale)).save(out / f"{name}.png")
    meta = {"iteration": iteration, "prompts": list(prompts), "scores": None if scores is None else
            [float(s) for s in scores], "rows": math.ceil(len(images) / cols), "cols": cols, "scale": scale}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return f"{SAMPLES_DIR}/{name}.png"


def load_grid(png: str | Path) -> tuple[np.ndarray, dict]:
    """A grid PNG → (grid (H, W, 3) uint8, its sidecar dict: iteration, prompts, scores, rows, cols, scale)."""
    png = Path(png)
    sidecar = png.with_suffix(".json")
    if not png.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"sample grid {png}: the PNG or its .json sidecar is missing")
    with Image.open(png) as im:
        grid = np.asarray(im.convert("RGB"))
    return grid, json.loads(sidecar.read_text())


def list_grids(run_dir: str | Path) -> list[Path]:
    """The run's grid PNGs ordered by iteration (the base grid first)."""
    pngs = [p for p in (Path(run_dir) / SAMPLES_DIR).glob("iter_*.png") if p.with_suffix(".json").is_file()]
    return sorted(pngs, key=lambda p: json.loads(p.with_suffix(".json").read_text())["iteration"])
