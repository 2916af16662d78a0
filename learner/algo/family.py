"""The rest of the family in MixGRPO's notation (../shared/docs/METHODS.md): TempFlow-GRPO, G²RPO, AWM, DiffusionNFT.

Pure functions only, like the rest of `learner/algo`: advantages, schedules and losses. σ ≡ t, x_t = (1−t)·x0 + t·ε,
v ≈ ε − x0; "mean_d" is a mean over a sample's elements. Shapes: P prompts (groups), G or K members, (C, H, W)
latents, B rows.

- TempFlow-GRPO (Shredded-Pork/TempFlow-GRPO): advantages per branch point over its K children, noise-aware
  weights w_i = s_i / mean_j s_j (the reference hard-codes c·s_i; the normalised form is METHODS.md's).
- G²RPO (bcmi/Granular-GRPO): the coarse Euler grids that finish a one-SDE-step trajectory at granularity j
  (always ending at σ = 0, where the reference can stop short), and advantages summed over granularities and
  rewards.
- AWM (scxue/advantage_weighted_matching): batch-std advantages scaled to [−1, 1], stratified training times,
  the flow-matching error, the uniform and "ghuber" weightings and the policy loss −Ā·exp(ψ − sg ψ).
- DiffusionNFT (NVlabs/DiffusionNFT): r ∈ [0, 1] from the advantage, the implicit positive and negative policies
  around the lagged old policy and their adaptively normalised x̂0 errors.
- Both AWM and NFT keep a lagged copy φ ← d·φ + (1−d)·θ with d = min(cap, rate·step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .advantages import global_std_advantages

# ------------------------------------------------------------------------------------------------ shared


def _check_groups(rewards: Tensor, min_members: int = 2) -> Tensor:
    if rewards.ndim != 2 or rewards.shape[1] < min_members:
        raise ValueError(f"rewards must be shaped (P, G) with G >= {min_members}, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.to(torch.float32)


def lagged_decay(step: int, *, rate: float = 0.001, cap: float) -> float:
    """d of the lagged copy's update after `step` optimizer steps: min(cap, rate·step) (AWM: cap 0.3, NFT: 0.5)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(cap, rate * step)


@torch.no_grad()
def lagged_update(lagged: Sequence[Tensor], current: Sequence[Tensor], decay: float) -> None:
    """φ ← d·φ + (1−d)·θ in place, tensor by tensor (d = 0: φ becomes θ)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for phi, theta in zip(lagged, current, strict=True):
        phi.mul_(decay).add_(theta.detach().to(phi.dtype), alpha=1.0 - decay)


def velocity_kl(v: Tensor, v_ref: Tensor) -> Tensor:
    """mean over rows of mean_d (v_θ − v_ref)²: AWM's and NFT's regulariser to the reference (β·this)."""
    return (v.float() - v_ref.detach().float()).pow(2).flatten(1).mean(dim=1).mean()


# ------------------------------------------------------------------------------------------------ TempFlow-GRPO


def branch_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """A_ik = (R_ik − mean_k R_i·) / (std_k R_i· + eps), population std, over the K children of one branch point.

    rewards: (P, K), one row per (main path, branch point). Equal rewards → zeros (no gradient from that step)."""
    r = _check_groups(rewards)
    return (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + eps)


def tempflow_advantages(per_reward: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ_r w_r·A_r with A_r = `branch_advantages` of reward r, weights normalised to sum 1.

    per_reward: name → (P·b, K) rewards, one row per (main path, branch point). → (P·b, K)."""
    from .advantages import _normalised

    w = _normalised(weights, set(per_reward))
    return sum(w[n] * branch_advantages(r) for n, r in per_reward.items())


def noise_aware_weights(stds: Tensor) -> Tensor:
    """w_i = s_i / mean_j s_j over the branch points' SDE stds s_i = g_i·√Δ_i (mean weight 1)."""
    s = stds.to(torch.float32).flatten()
    if s.numel() == 0 or not torch.all(s > 0):
        raise ValueError("noise-aware weights need positive stds")
    return s / s.mean()


def tempflow_forwards(num_steps: int, branch_points: Sequence[int], children: int) -> int:
    """Model evaluations per main path: N−1 shared Euler steps plus K children finished from σ_{i+1}: N−1−i each
    (the branch step's mean reuses the main path's velocity)."""
    if any(not 0 <= i < num_steps - 1 for i in branch_points):
        raise ValueError(f"branch points must lie in [0, {num_steps - 1}), got {list(branch_points)}")
    return num_steps - 1 + children * sum(num_steps - 1 - i for i in branch_points)


# ------------------------------------------------------------------------------------------------ G²RPO


def granularity_grid(sigmas: Tensor, step: int, granularity: int) -> Tensor:
    """The σ grid that finishes a trajectory after its SDE step k at granularity j: σ_{k+1}, σ_{k+2}, σ_{k+2+j},
    σ_{k+2+2j}, …, then 0 if the grid has not reached it.

    sigmas: (N+1,) the rollout schedule, ending at 0. As bcmi/Granular-GRPO's `run_ode_sample_step` does
    (fastvideo/train_g2rpo_hps.py: the grid cat(σ[:k+2], σ[k+2::j])), the first step after the SDE step is the
    schedule's own; METHODS.md's σ_{k+1}, σ_{k+1+j}, … differs in that one point. Where the reference stops short
    of 0 it scores x̂0 = x − σ·v from the last grid point, which is exactly one more Euler step to σ = 0: appended.
    """
    n = sigmas.numel() - 1
    if not 0 <= step < n - 1:
        raise ValueError(f"the SDE step must lie in [0, {n - 1}), got {step}")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    grid = torch.cat([sigmas[step + 1:step + 2], sigmas[step + 2::granularity]])
    if grid[-1] != 0:
        grid = torch.cat([grid, sigmas.new_zeros(1)])
    return grid


def integrated_advantages(rewards: Tensor, *, reward_weights: Tensor | None = None, eps: float = 1e-8,
                           clip: float = 5.0) -> Tensor:
    """A_g = Σ_j Σ_r u_r·(R^{(j, r)}_g − mean_g) / (std_g + eps), unbiased std, clipped to ±clip.

    rewards: (J, R, P, G): granularities, rewards, groups (one per prompt and SDE step k), members. → (P, G).
    Granularities and rewards are summed, not averaged (G²RPO's integration). reward_weights: (R,) u_r, scaled
    here to mean 1, so equal weights (and None) give the plain sum."""
    if rewards.ndim != 4:
        raise ValueError(f"rewards must be shaped (J, R, P, G), got {tuple(rewards.shape)}")
    r = _check_groups(rewards.flatten(0, 2)).view(rewards.shape)
    z = (r - r.mean(dim=-1, keepdim=True)) / (r.std(dim=-1, unbiased=True, keepdim=True) + eps)
    if reward_weights is not None:
        u = reward_weights.to(torch.float32).flatten()
        if u.numel() != r.shape[1] or not torch.all(u > 0):
            raise ValueError(f"reward_weights must be {r.shape[1]} positive values, got {reward_weights.tolist()}")
        z = z * (u / u.mean()).view(1, -1, 1, 1)
    return z.sum(dim=(0, 1)).clamp(-clip, clip)


# ------------------------------------------------------------------------------------------------ AWM


def batch_std_advantages(rewards: Tensor, *, eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """AWM / NFT: A = (R − mean_group R) / (population std over the whole batch + eps), clipped to ±clip.
    rewards: (P, G) → (P, G)."""
    return global_std_advantages(rewards, eps=eps).clamp(-clip, clip)


def stratified_indices(num_points: int, draws: int, generator: torch.Generator) -> Tensor:
    """T stratified draws over a grid of `num_points` training times: the grid is cut into T contiguous strata of
    near-equal size and one index is drawn uniformly in each (ascending). → (T,) long."""
    if not 1 <= draws <= num_points:
        raise ValueError(f"need 1 <= draws <= {num_points} grid points, got {draws}")
    edges = torch.linspace(0, num_points, draws + 1).round().long()
    u = torch.rand(draws, generator=generator)
    width = (edges[1:] - edges[:-1]).float()
    return edges[:-1] + (u * width).floor().long().clamp(max=width.long() - 1)


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1−t)·x0 + t·ε, t per row (B,) or a scalar."""
    tt = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1))) if torch.is_tensor(t) and t.ndim else t
    return (1 - tt) * x0 + tt * noise


def flow_matching_error(v: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """L = mean_d (v − (ε − x0))² per row, in fp32. → (B,)"""
    return (v.float() - (noise.float() - x0.float())).pow(2).flatten(1).mean(dim=1)


def ghuber_psi(err: Tensor, t: Tensor, *, p: float = 0.25, delta: float = 1e-10) -> Tensor:
    """AWM's default weighting: ψ = −t·[(L + δ)^p − δ^p]/p (a generalised Huber of the error, scaled by t)."""
    return -t * ((err + delta) ** p - delta**p) / p


def awm_loss(err: Tensor, t: Tensor, adv: Tensor, *, weighting: Literal["uniform", "ghuber"] = "ghuber",
             clip: float = 5.0) -> Tensor:
    """Advantage-weighted matching: mean over rows of −Ā·exp(ψ − sg ψ), Ā = clip(A, ±clip)/clip.

    Its value is −mean Ā; its gradient is −Ā·∇ψ: uniform (ψ = −L) gives Ā·∇L, plain advantage-weighted flow
    matching. err, t, adv: (B,)."""
    if weighting == "uniform":
        psi = -err
    elif weighting == "ghuber":
        psi = ghuber_psi(err, t)
    else:
        raise ValueError(f"unknown AWM weighting {weighting!r}; expected uniform or ghuber")
    a = adv.float().clamp(-clip, clip) / clip
    return (-a * torch.exp(psi - psi.detach())).mean()


# ------------------------------------------------------------------------------------------------ DiffusionNFT


def nft_optimality(adv: Tensor, *, clip: float = 5.0) -> Tensor:
    """r = clip(A, ±clip)/(2·clip) + ½ ∈ [0, 1] (A = 0 → ½: no preference)."""
    return adv.float().clamp(-clip, clip) / (2 * clip) + 0.5


def _normalised_x0_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    diff = (x0_hat - x0).flatten(1)
    scale = diff.abs().mean(dim=1).clamp(min=1e-5).detach()
    return diff.pow(2).mean(dim=1) / scale


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, *, beta: float = 1.0) -> Tensor:
    """Negative-aware fine-tuning: mean over rows of [r·L⁺ + (1−r)·L⁻]/β, with
    v⁺ = β·v + (1−β)·sg(v_old), v⁻ = (1+β)·sg(v_old) − β·v, x̂0^± = x_t − t·v^±,
    L^± = mean_d (x̂0^± − x0)² / sg(max(mean_d |x̂0^± − x0|, 1e-5)). v, v_old, x_t, x0: (B, …); t, r: (B,)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    v, v_old = v.float(), v_old.detach().float()
    tt = t.float().reshape(-1, *([1] * (v.ndim - 1)))
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    loss_pos = _normalised_x0_error(x_t.float() - tt * v_pos, x0.float())
    loss_neg = _normalised_x0_error(x_t.float() - tt * v_neg, x0.float())
    return ((r * loss_pos + (1 - r) * loss_neg) / beta).mean()
