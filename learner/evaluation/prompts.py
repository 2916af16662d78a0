"""The evaluation prompts: one balanced held-out set for the shapes world, a prompts file for real models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services import shapes_world
from services.config import Config
from services.prompts import read_prompts_file


def shapes_prompts(split: str, per_category: int, seed: int,
                   categories: Sequence[str] = shapes_world.CATEGORIES) -> list[str]:
    """`per_category` prompts of each category of `split`, in category order, fixed by `seed`.

    Without replacement while the category's pool lasts, then cycling through a second shuffle, and so
    on (the held-out `single` pool has only 4 prompts; the repeats get different noise when sampled).
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for cat in categories:
        pool = shapes_world.all_prompts(split, (cat,))
        picks: list[str] = []
        while len(picks) < per_category:
            picks += [pool[i] for i in rng.permutation(len(pool))]
        out += picks[:per_category]
    return out


def heldout_prompts(per_category: int, seed: int) -> list[str]:
    """The held-out evaluation set: balanced over the categories, colour-shape pairs never trained on."""
    return shapes_prompts("heldout", per_category, seed)


def file_prompts(path: str, n: int | None = None, *, shapes_grammar: bool = False) -> list[str]:
    """The first `n` prompts of a prompts file (all of them for None)."""
    prompts = read_prompts_file(path, shapes_grammar=shapes_grammar)
    return prompts if n is None else prompts[:n]


def run_prompts(cfg: Config) -> list[str]:
    """A run's evaluation prompts: `run.eval_prompts` balanced held-out shapes prompts drawn with
    `run.eval_seed` (tiny backend), else the first `run.eval_prompts` lines of `run.eval_prompts_file`."""
    if cfg.model.backend == "tiny":
        return heldout_prompts(cfg.run.eval_prompts // len(shapes_world.CATEGORIES), cfg.run.eval_seed)
    if cfg.run.eval_prompts_file is None:  # the config refuses this; a config built without validation may not
        raise ValueError(f"run.eval_prompts_file is required for model.backend={cfg.model.backend!r}")
    return file_prompts(cfg.run.eval_prompts_file, cfg.run.eval_prompts)
