"""Group-relative advantages (GRPO), single and multi-reward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, *, eps: float = 1e-8) -> Tensor:
    """z-score within each group: A = (R − mean_g R) / (std_g R + eps), unbiased std.

    Args:
        rewards: (P, G) — P prompts, G samples each.
    Returns:
        (P, G) fp32. A group whose rewards are all equal gets zeros (not NaN).
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be shaped (P, G) with G >= 2, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    r = rewards.to(torch.float32)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True)
    return (r - mean) / (std + eps)


def global_std_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """Centred within each group, scaled by the whole batch: A = (R − mean_g R) / (std R + eps), population std
    over all P·G rewards (Flow-GRPO's `PerPromptStatTracker(global_std=True)`, flow_grpo/stat_tracking.py).

    Args:
        rewards: (P, G) — P prompts, G samples each.
    Returns:
        (P, G) fp32.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be shaped (P, G) with G >= 2, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    r = rewards.to(torch.float32)
    return (r - r.mean(dim=1, keepdim=True)) / (r.std(unbiased=False) + eps)


def _normalised(weights: Mapping[str, float], names: set[str]) -> dict[str, float]:
    if set(weights) != names:
        raise ValueError(f"weights {sorted(weights)} do not match rewards {sorted(names)}")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"reward weights must be > 0, got {dict(weights)}")
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def combine_advantages(
    per_reward: Mapping[str, Tensor], weights: Mapping[str, float], *,
    aggregation: Literal["advantage", "reward"] = "advantage", std: Literal["group", "global"] = "group",
) -> Tensor:
    """Advantages from several rewards, weights normalised to sum 1.

    Args:
        per_reward: name → raw rewards (P, G).
        aggregation: "advantage" (paper default): Σ_k w_k·z(R_k); "reward": z(Σ_k w_k·R_k).
        std: z's scale: "group" (`group_advantages`) or "global" (`global_std_advantages`, Flow-GRPO).
    Returns:
        (P, G) fp32 (unclipped; grpo_loss clips).
    """
    if not per_reward:
        raise ValueError("combine_advantages needs at least one reward")
    if std not in ("group", "global"):
        raise ValueError(f"unknown std {std!r}; expected 'group' or 'global'")
    z = group_advantages if std == "group" else global_std_advantages
    w = _normalised(weights, set(per_reward))
    if aggregation == "advantage":
        return sum(w[k] * z(r) for k, r in per_reward.items())
    if aggregation == "reward":
        return z(sum(w[k] * r.to(torch.float32) for k, r in per_reward.items()))
    raise ValueError(f"unknown aggregation {aggregation!r}; expected 'advantage' or 'reward'")
