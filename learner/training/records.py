"""The update's record: what one `Learner.update` reports (one line of metrics.jsonl, with the driver's fields)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from services.types import RolloutBatch

RATIO_STATS = ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl", "first_ratio_dev")
"""The update record's fields of the clipped-ratio objective (GRPO's), absent from a matching objective's record."""


def update_record(batch: RolloutBatch, stats: Mapping[str, list], reward_weights: Mapping[str, float],
                  objective: str, adv: torch.Tensor, **fields) -> dict:
    """The batch's rewards (weighted mean, per reward mean and std), the micro-batches' statistics reduced (`stats`:
    lists per micro-batch or optimizer step), and `fields` as given. AWM and DiffusionNFT have no likelihood ratio
    and clip nothing: their records leave RATIO_STATS out rather than carry a made-up ratio of 1 and clip fraction 0."""
    total_w = sum(reward_weights.values())
    out = {
        "images_scored": int(next(iter(batch.rewards.values())).numel()),  # G²RPO: one image per row and grid
        "reward_mean": sum(reward_weights[n] * float(r.mean()) for n, r in batch.rewards.items()) / total_w,
        **{f"reward_mean/{n}": float(r.mean()) for n, r in batch.rewards.items()},
        **{f"reward_std/{n}": float(r.std()) for n, r in batch.rewards.items()},
        "nfe": batch.nfe, "image_evals": batch.image_evals, "rollout_timings": batch.timings,
        "loss": float(np.mean(stats["loss"])), "ratio_mean": float(np.mean(stats["ratio_mean"])),
        "ratio_min": float(np.min(stats["ratio_min"])), "ratio_max": float(np.max(stats["ratio_max"])),
        "clip_frac": float(np.mean(stats["clip_frac"])), "approx_kl": float(np.mean(stats["approx_kl"])),
        "kl": float(np.mean(stats["kl"])),
        "grad_norm": float(np.mean(stats["grad_norm"])), "grad_norm_max": float(np.max(stats["grad_norm"])),
        "first_ratio_dev": stats["first_ratio_dev"][0], "num_updates": len(stats["grad_norm"]),
        "forward_rows": int(sum(stats["forward_rows"])), "objective": objective,
        "adv_abs_mean": float(np.abs(adv.cpu().numpy()).mean()), **fields,
    }
    if objective != "grpo":
        for k in RATIO_STATS:
            del out[k]
    return out
