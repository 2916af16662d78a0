"""Evaluation, one path for the run, the tools and the benchmarks: held-out prompts → seeded full-step ODE
samples → per-category scores.

    prompts = run_prompts(cfg)                                 # the run's held-out set (prompts.py)
    result = evaluate(policy, prompts, **settings(cfg), rewards=scorers, grid=16)
    eval_record(iteration, result)                             # the metrics.jsonl record (scoring.py)

Backend-aware: the tiny backend is judged by the shapes rule verifier on balanced held-out prompts
(plus any `run.eval_rewards`); sd3 / flux by the configured rewards on `run.eval_prompts_file`, never by
the 32×32 verifier. Everything is fixed by the seed (prompt draw and initial noise), so two evaluations
of the same weights give identical numbers and evaluations compare across iterations and runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.config import Config, RewardSpec

from .prompts import file_prompts, heldout_prompts, run_prompts, shapes_prompts
from .sampling import AdapterOff, initial_noise, sample_images
from .scoring import ScoreFn, eval_record, headline, markdown_table, score_images


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


def evaluate(policy, prompts: Sequence[str], *, num_steps: int, shift: float, seed: int, verifier: bool,
             rewards: Mapping[str, ScoreFn] | None = None, base=None, fraction: float = 1.0, grid: int = 0,
             batch_size: int = 64) -> dict:
    """Sample one image per prompt (`sample_images`) and score it (`score_images`).

    Returns `score_images`'s dict plus "num_steps", "shift", "seed", "hybrid_fraction"; with `grid` = k > 0
    also "grid": k evenly spaced samples {"images" (k, H, W, 3) uint8, "prompts", "scores" (headline column)}.
    """
    images = sample_images(policy, prompts, num_steps=num_steps, shift=shift, seed=seed, base=base,
                           fraction=fraction, batch_size=batch_size)
    result = score_images(prompts, images, verifier=verifier, rewards=rewards, batch_size=batch_size)
    result |= {"num_steps": num_steps, "shift": shift, "seed": seed, "hybrid_fraction": fraction}
    if grid > 0:
        idx = grid_indices(len(prompts), grid)
        column = result["scores"][headline(result)]
        result["grid"] = {"images": np.ascontiguousarray(images[idx]), "prompts": [prompts[i] for i in idx],
                          "scores": [column[i] for i in idx]}
    return result


__all__ = [
    "AdapterOff", "ScoreFn", "eval_record", "evaluate", "file_prompts", "grid_indices", "headline",
    "heldout_prompts", "initial_noise", "markdown_table", "reward_specs", "run_prompts", "sample_images",
    "score_images", "settings", "shapes_prompts",
]
