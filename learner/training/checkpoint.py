"""Checkpoints: trainable weights (safetensors), optimizer state, and a JSON manifest with checksums.

    <run>/checkpoints/iter_000050/{weights.safetensors, optimizer.pt, state.json}

`state.json` holds the iteration, weight version, RNG state and a sha256 of every file, so a
truncated or corrupted checkpoint is a clear error, never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
FILES = ("weights.safetensors", "optimizer.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: str | Path, iteration: int, weights: dict, optimizer: dict, meta: dict) -> Path:
    """Write atomically: into a temp folder, then rename to iter_XXXXXX."""
    root = Path(root)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    state = {"format": FORMAT, "iteration": iteration, **meta,
             "sha256": {name: _sha256(tmp / name) for name in FILES}}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = sorted(p for p in Path(root).glob("iter_*") if p.is_dir())
    return dirs[-1] if dirs else None


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's meta (state.json) once every file is there and matches its sha256, without loading a
    tensor (the driver checks a `--resume` before starting Ray); raises CheckpointError naming the problem."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path}: state.json is missing")
    try:
        meta = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupted ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT}")
    for name in FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(f) != meta["sha256"].get(name):
            raise CheckpointError(f"checkpoint {path}: {name} does not match its recorded sha256 (truncated or corrupted)")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """Returns (weights, optimizer state, meta); raises CheckpointError on anything missing or altered."""
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        weights = load_file(str(path / "weights.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is the same user-facing problem
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from e
    return weights, optim, meta
