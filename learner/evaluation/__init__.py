"""Evaluation, one path for the run, the tools and the benchmarks: held-out prompts → seeded full-step ODE
samples → per-category scores.

    prompts = run_prompts(cfg)                                 # the run's held-out set (prompts.py)
    result = evaluate(policy, prompts, **settings(cfg), rewards=scorers, grid=16)
    eval_record(iteration, result)                             # the metrics.jsonl record (scoring.py)
    parts = [evaluate_shard(policy_k, prompts, shard, **settings(cfg)) for shard in shards(len(prompts), k)]
    combine(prompts, parts, verifier=True, grid=16)            # = evaluate(...): k workers share one evaluation

Backend-aware: the tiny backend is judged by the shapes rule verifier on balanced held-out prompts
(plus any `run.eval_rewards`); sd3 / flux by the configured rewards on `run.eval_prompts_file`, never by
the 32×32 verifier. Everything is fixed by the seed (prompt draw and initial noise), so two evaluations
of the same weights give identical numbers and evaluations compare across iterations and runs. Every overall
column comes with its standard error (`summarize`), so a change between two evaluations can be read against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.config import Config, RewardSpec

from .prompts import file_prompts, heldout_prompts, run_prompts, shapes_prompts
from .sampling import AdapterOff, initial_noise, sample_images
from .scoring import (
    HEADROOM,
    ScoreFn,
    eval_record,
    headline,
    headroom,
    image_requirements,
    image_scores,
    macro_stderr,
    markdown_table,
    requirement_rates,
    requirements_table,
    score_images,
    shape_confusion,
    summarize,
)


def settings(cfg: Config) -> dict:
    """The sampler and verifier settings of a run's evaluation (keyword arguments of `evaluate`)."""
    return {"num_steps": cfg.sampler.num_steps, "shift": cfg.sampler.shift, "seed": cfg.run.eval_seed,
            "verifier": cfg.model.backend == "tiny"}


def reward_specs(cfg: Config) -> list[RewardSpec]:
    """The rewards that score a run's evaluation: `run.eval_rewards`, by default all configured rewards for
    sd3 / flux and none for the tiny backend (the verifier judges it)."""
    names = cfg.run.eval_rewards
    if names is None:
        names = [] if cfg.model.backend == "tiny" else [r.name for r in cfg.reward.rewards]
    return [r for r in cfg.reward.rewards if r.name in names]


def grid_indices(n: int, k: int) -> list[int]:
    """k evenly spaced indices of n (all of them if k >= n): a grid that spans every category."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def shards(n: int, k: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of k contiguous parts of n prompts, sizes differing by at most one (no empty part)."""
    k = max(1, min(k, n))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def evaluate_shard(policy, prompts: Sequence[str], shard: tuple[int, int] | None = None, *, num_steps: int,
                   shift: float, seed: int, verifier: bool, rewards: Mapping[str, ScoreFn] | None = None, base=None,
                   fraction: float = 1.0, grid: int = 0, batch_size: int = 64, breakdown: bool = False) -> dict:
    """Sample and score prompts[lo:hi] of an evaluation set, each with the noise its position gets in the whole
    set, so that the shards of k workers, `combine`d, are the single-process evaluation exactly.

    -> {"shard": [lo, hi], "scores": {column: [per image]}, "grid": {index: (H, W, 3) uint8} for the set's
        `grid_indices(len(prompts), grid)` that fall in this shard}; with `breakdown` (verifier only) also
        "requirements": `image_requirements` rows, what the verifier counted per image
    """
    lo, hi = shard or (0, len(prompts))
    if not 0 <= lo < hi <= len(prompts):
        raise ValueError(f"shard [{lo}, {hi}) is not a non-empty part of {len(prompts)} prompts")
    part = list(prompts[lo:hi])
    noise = initial_noise(policy.latent_shape, len(prompts), seed)[lo:hi]
    images = sample_images(policy, part, num_steps=num_steps, shift=shift, noise=noise, base=base,
                           fraction=fraction, batch_size=batch_size)
    scores = image_scores(part, images, verifier=verifier, rewards=rewards, batch_size=batch_size)
    cells = [i for i in (grid_indices(len(prompts), grid) if grid > 0 else []) if lo <= i < hi]
    out = {"shard": [lo, hi], "scores": {k: v.tolist() for k, v in scores.items()},
           "grid": {i: np.ascontiguousarray(images[i - lo]) for i in cells}}
    if breakdown:
        if not verifier:
            raise ValueError("a requirement breakdown needs the shapes verifier (the tiny backend's prompts)")
        out["requirements"] = image_requirements(part, images)
    return out


def combine(prompts: Sequence[str], parts: Sequence[Mapping], *, verifier: bool, grid: int = 0, **settings) -> dict:
    """`evaluate_shard` results covering the whole set once (any order) → `evaluate`'s dict; `settings` (num_steps,
    shift, seed, hybrid_fraction) are recorded in it; shards with "requirements" add `requirement_rates` and
    `shape_confusion` and `headroom`."""
    parts = sorted(parts, key=lambda r: r["shard"][0])
    bounds = [tuple(r["shard"]) for r in parts]
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != len(prompts) or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"evaluation shards {bounds} do not cover the {len(prompts)} prompts exactly once")
    columns = list(parts[0]["scores"])
    scores = {c: [v for r in parts for v in r["scores"][c]] for c in columns}
    result = summarize(prompts, scores, verifier=verifier) | settings
    if all("requirements" in r for r in parts):
        rows = [row for r in parts for row in r["requirements"]]
        result["requirements"], result["shape_confusion"] = requirement_rates(prompts, rows), shape_confusion(rows)
        result["headroom"] = headroom(prompts, rows)
    if grid > 0:
        idx = grid_indices(len(prompts), grid)
        cells = {i: im for r in parts for i, im in r["grid"].items()}
        column = result["scores"][headline(result)]
        result["grid"] = {"images": np.stack([cells[i] for i in idx]), "prompts": [prompts[i] for i in idx],
                          "scores": [column[i] for i in idx]}
    return result


def evaluate(policy, prompts: Sequence[str], *, num_steps: int, shift: float, seed: int, verifier: bool,
             rewards: Mapping[str, ScoreFn] | None = None, base=None, fraction: float = 1.0, grid: int = 0,
             batch_size: int = 64, breakdown: bool = False) -> dict:
    """Sample one image per prompt (`sample_images`) and score it: one shard of the whole set (`evaluate_shard`,
    `combine`); `breakdown` adds "requirements", per category the verifier's requirement rates, and
    "shape_confusion", the shape drawn for each shape asked in the single-object prompts.

    Returns `summarize`'s dict (overall columns with their standard errors, per category, per image) plus
    "num_steps", "shift", "seed", "hybrid_fraction"; with `grid` = k > 0 also "grid": k evenly spaced samples
    {"images" (k, H, W, 3) uint8, "prompts", "scores" (headline column)}.
    """
    part = evaluate_shard(policy, prompts, None, num_steps=num_steps, shift=shift, seed=seed, verifier=verifier,
                          rewards=rewards, base=base, fraction=fraction, grid=grid, batch_size=batch_size,
                          breakdown=breakdown)
    return combine(prompts, [part], verifier=verifier, grid=grid, num_steps=num_steps, shift=shift, seed=seed,
                   hybrid_fraction=fraction)


__all__ = [
    "HEADROOM", "AdapterOff", "ScoreFn", "combine", "eval_record", "evaluate", "evaluate_shard",
    "file_prompts", "grid_indices", "headline", "headroom", "heldout_prompts", "image_requirements",
    "image_scores", "initial_noise", "macro_stderr", "markdown_table", "requirement_rates",
    "requirements_table", "reward_specs", "run_prompts", "sample_images", "score_images", "settings",
    "shape_confusion", "shapes_prompts", "shards", "summarize",
]
