"""Base-policy evaluation in the shapes world: full-step ODE samples scored by the rule verifier.

    prompts = eval_prompts("heldout", per_category=16, seed=0)
    result = evaluate_policy(policy, prompts, num_steps=25, shift=3.0, seed=0)
    print(markdown_table({"heldout": result}))

The verifier (`services.shapes_world.verify`) is the gold metric: the learned reward model is what RL
optimises, this is what it is judged by. Everything is fixed by `seed` (the prompt draw and the initial
noise), so two evaluations of the same weights give identical numbers, and the trainer can reuse this
for its periodic held-out evals and compare them across iterations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learner.algo import sample_ode, sigma_schedule
from services import shapes_world

EVAL_STEPS = 25  # the paper's reference schedule: N = 25, shift 3
EVAL_SHIFT = 3.0


def eval_prompts(split: str, per_category: int, seed: int,
                 categories: Sequence[str] = shapes_world.CATEGORIES) -> list[str]:
    """`per_category` prompts of each category, in category order, fixed by `seed`.

    Without replacement while the category's pool lasts, then cycling through a second shuffle, and so
    on (the held-out `single` pool has only 4 prompts; the repeats get different noise in
    `evaluate_policy`).
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


@torch.no_grad()
def sample_images(policy, prompts: Sequence[str], *, num_steps: int = EVAL_STEPS, shift: float = EVAL_SHIFT,
                  seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Euler ODE samples through the whole shifted schedule -> uint8 images (P, 32, 32, 3).

    The initial noise (P, C, H, W) is drawn at once from a generator seeded with `seed`, so a prompt's
    image does not depend on `batch_size`.
    """
    sigmas = sigma_schedule(num_steps, shift)  # (N+1,)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=g)  # (P, C, H, W)
    images = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        cond = policy.encode_prompts(chunk)
        x = sample_ode(policy.velocity, noise[lo:lo + batch_size].to(policy.device), cond, sigmas)  # (b, C, H, W)
        images.append(policy.decode(x))  # (b, 32, 32, 3)
    return np.concatenate(images, axis=0)


def score_images(prompts: Sequence[str], images: np.ndarray) -> dict:
    """Verifier score and strict pass of each (prompt, image (32, 32, 3)), aggregated per category.

    Returns {"score", "strict", "num_prompts", "per_category": {cat: {"score", "strict", "n"}},
    "prompts", "scores", "stricts"}. The overall score / strict are macro-averages over the categories
    present, so an unbalanced prompt list does not tilt them towards its biggest category.
    """
    if len(prompts) != len(images) or not len(prompts):
        raise ValueError(f"need one image per prompt and at least one, got {len(prompts)} / {len(images)}")
    verdicts = [shapes_world.verify(p, img) for p, img in zip(prompts, images)]
    cats = [shapes_world.category(p) for p in prompts]
    per_category = {}
    for cat in shapes_world.CATEGORIES:
        idx = [i for i, c in enumerate(cats) if c == cat]
        if idx:
            per_category[cat] = {"score": float(np.mean([verdicts[i].score for i in idx])),
                                 "strict": float(np.mean([verdicts[i].strict for i in idx])), "n": len(idx)}
    return {
        "score": float(np.mean([m["score"] for m in per_category.values()])),
        "strict": float(np.mean([m["strict"] for m in per_category.values()])),
        "num_prompts": len(prompts),
        "per_category": per_category,
        "prompts": list(prompts),
        "scores": [v.score for v in verdicts],
        "stricts": [v.strict for v in verdicts],
    }


def evaluate_policy(policy, prompts: Sequence[str], *, num_steps: int = EVAL_STEPS, shift: float = EVAL_SHIFT,
                    seed: int = 0, batch_size: int = 64) -> dict:
    """Sample one image per prompt (ODE, fixed noise from `seed`) and score it with the verifier.

    `policy` is any backend with `encode_prompts`, `velocity`, `decode` and `latent_shape` whose images
    are 32x32 shapes-world images (in practice the tiny policy). Returns `score_images`'s dict plus
    "num_steps", "shift", "seed".
    """
    images = sample_images(policy, prompts, num_steps=num_steps, shift=shift, seed=seed, batch_size=batch_size)
    return {**score_images(prompts, images), "num_steps": num_steps, "shift": shift, "seed": seed}


def markdown_table(results: dict[str, dict]) -> str:
    """{split: evaluate_policy result} -> a Markdown table: one row per (split, category) and overall."""
    lines = ["| split | category | n | verifier score | strict accuracy |", "|---|---|---|---|---|"]
    for split, r in results.items():
        for cat, m in r["per_category"].items():
            lines.append(f"| {split} | {cat} | {m['n']} | {m['score']:.3f} | {m['strict']:.3f} |")
        lines.append(f"| {split} | **overall** | {r['num_prompts']} | **{r['score']:.3f}** | **{r['strict']:.3f}** |")
    return "\n".join(lines)
