"""The clipped GRPO objective on window transitions, and the KL penalty to a reference policy."""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float, adv_clip_max: float = 5.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-style clipped loss, max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), averaged over all entries (each entry times its
    weight when `weights` is given: TempFlow-GRPO's noise-aware w_i).

    Args:
        log_prob: (B, T) or (B,) log π_θ with gradients, T window steps.
        old_log_prob: same shape, log π_old recorded at rollout (fp32, no gradients).
        advantages: (B,) per sample, clipped to ±adv_clip_max.
        weights: (B,) or (B, T) non-negative weights of the entries (None: 1).
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
    if weights is not None:
        w = weights.detach().to(per_entry.dtype)
        per_entry = per_entry * (w if w.ndim == 2 else w[:, None])
    with torch.no_grad():
        metrics = {
            "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((lp - old) ** 2).mean(),
            "loss_per_step": per_entry.mean(dim=0),
        }
    return per_entry.mean(), metrics


def kl_penalty(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(μ_θ, std²) ‖ N(μ_ref, std²)) per sample, averaged over elements: mean_d (μ_θ − μ_ref)² / (2·std²).

    The transitions of the policy and the reference share their std (it depends on σ and η only), so the KL
    of the two Gaussians is the squared distance of their means in std units. Averaged over elements like
    the log-probs (the paper's convention), so β is on the per-element scale.

    Args:
        mean: (B, …) μ_θ with gradients; ref_mean: (B, …) μ_ref (no gradients);
        std: broadcastable to mean (0-d or (B, 1, …)), the transition's std.
    Returns:
        (B,) penalties.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    return ((mean - ref_mean.detach()) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)

