"""Policy backends: one file each, all satisfying `base.Policy`.

    policy = load_policy("tiny", "checkpoints/tiny", lora_rank=0, autocast_bf16=False)
    policy = load_policy("sd3", "/models/sd3.5-medium", height=512, width=512, lora_rank=32)

`BACKENDS` maps a backend name to its loader `(path, **options) -> Policy`; the backend modules are
imported on first use so a tiny run never imports the SD3 / FLUX pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import Cond, Policy, cond_cat, cond_index, cond_repeat_interleave


def _tiny(path: str | Path, **options) -> Policy:
    from .tiny import TinyPolicy

    return TinyPolicy.load(path, **options)


def _sd3(path: str | Path, **options) -> Policy:
    from .sd3 import SD3Policy

    return SD3Policy.load(path, **options)


def _flux(path: str | Path, **options) -> Policy:
    from .flux import FluxPolicy

    return FluxPolicy.load(path, **options)


BACKENDS: dict[str, Callable[..., Policy]] = {"tiny": _tiny, "sd3": _sd3, "flux": _flux}


def load_policy(kind: str, path: str | Path, **options) -> Policy:
    """Load backend `kind` from the local folder `path`; the options go to its loader."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown policy backend {kind!r}; known: {sorted(BACKENDS)}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{kind} policy: checkpoint folder {path} does not exist")
    return BACKENDS[kind](path, **options)


__all__ = ["BACKENDS", "Cond", "Policy", "cond_cat", "cond_index", "cond_repeat_interleave", "load_policy"]
