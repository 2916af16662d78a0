"""The clipped GRPO objective on window transitions."""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float, adv_clip_max: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-style clipped loss, max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), averaged over all entries.

    Args:
        log_prob: (B, T) or (B,) log π_θ with gradients, T window steps.
        old_log_prob: same shape, log π_old recorded at rollout (fp32, no gradients).
        advantages: (B,) per sample, clipped to ±adv_clip_max.
    Returns:
        loss (0-d) and detached metrics: ratio_mean/min/max, clip_frac, approx_kl, loss_per_step (T,).
    """
    if log_prob.shape != old_log_prob.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)} and old_log_prob {tuple(old_log_prob.shape)} differ")
    if advantages.shape != log_prob.shape[:1]:
        raise ValueError(f"advantages must be shaped ({log_prob.shape[0]},), got {tuple(advantages.shape)}")
    lp = log_prob if log_prob.ndim == 2 else log_prob[:, None]  # (B, T)
    old = (old_log_prob if old_log_prob.ndim == 2 else old_log_prob[:, None]).detach()
    adv = advantages.detach().clamp(-adv_clip_max, adv_clip_max)[:, None]  # (B, 1)
    ratio = torch.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_entry = torch.maximum(unclipped, clipped)  # (B, T)
    with torch.no_grad():
        metrics = {
            "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((lp - old) ** 2).mean(),
            "loss_per_step": per_entry.mean(dim=0),
        }
    return per_entry.mean(), metrics
