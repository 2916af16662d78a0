"""The mixed ODE-SDE sampler: ODE before the window, SDE inside it, Euler or DPM-Solver++ after.

Group sampling: the G members of a group share their initial noise, so their trajectories are
identical until the window starts. The prefix, and the velocity of the window's first step (taken at the
members' common x_l), are computed once per group (batch P); the batch branches to P·G with that step's SDE
samples. The learner shares the same step's forward among the group members of a micro-batch (updates.py).
With `shared_noise=False` (Flow-GRPO's sampling: its reference draws every image's latents on its own) each member
starts from its own noise and nothing is shared: the prefix and the first window step run at batch P·G.

`sample_branched` is the other rollout shape (TempFlow-GRPO, G²RPO; ../shared/docs/METHODS.md §1–2): one
deterministic main path per group, and at each branch step k, K children that take their one SDE step there
and are finished by Euler on one or more grids. The main path is the shared prefix of every child.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .dpm import dpmpp_2m_step
from .family import granularity_grid
from .schedule import flash_schedule
from .transitions import SdeKind, SdeStep, ode_step, sde_step
from .window import Window

Cond = Mapping[str, Tensor]
VelocityFn = Callable[[Tensor, Tensor, Cond], Tensor]  # (x (B,…), sigma (B,), cond) → v (B,…)
PostWindow = Literal["euler", "dpm"]


@dataclass
class Trajectory:
    """What a rollout hands to the learner (all fp32), plus the final sample."""

    final: Tensor  # (P·G, C, H, W)
    latents: Tensor  # (P·G, w, C, H, W)  x_i at each window step
    next_latents: Tensor  # (P·G, w, C, H, W)  x_{i+1}
    log_probs: Tensor  # (P·G, w)  log π_old
    sigmas: Tensor  # (w,)  σ_i of the window steps
    sigmas_next: Tensor  # (w,)  σ_{i+1}
    nfe: int  # sequential model evaluations along one trajectory
    image_evals: int  # model evaluations × batch rows (the compute actually spent)


@dataclass
class BranchedTrajectory:
    """A branched rollout (all fp32). R = P·b·K rows: group p, branch step j (of b), child k at row (p·b + j)·K + k;
    each row holds one SDE transition x̄_k → y."""

    finals: Tensor  # (J, R, C, H, W)  each child finished on each of the J grids
    latents: Tensor  # (R, 1, C, H, W)  x̄_k, the main path at the row's branch step
    next_latents: Tensor  # (R, 1, C, H, W)  y, the child's SDE sample
    log_probs: Tensor  # (R, 1)  log π_old(y | x̄_k)
    sigmas: Tensor  # (R, 1)  σ_k
    sigmas_next: Tensor  # (R, 1)  σ_{k+1}
    steps: Tensor  # (R,) long, k
    nfe: int  # model evaluations along the longest child trajectory
    image_evals: int


def repeat_cond(cond: Cond, repeats: int) -> dict[str, Tensor]:
    """Each row of every batch-first tensor repeated `repeats` times in place: (P, …) → (P·G, …)."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


def _velocity(fn: VelocityFn, x: Tensor, sigma: float, cond: Cond) -> Tensor:
    sig = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    return fn(x, sig, cond).to(torch.float32)


def _post_window(
    fn: VelocityFn, x: Tensor, cond: Cond, sigmas: Tensor, window: Window, method: PostWindow, ratio: float
) -> tuple[Tensor, int]:
    """Steps after the window; returns the final sample and the number of model evaluations."""
    if method == "euler":
        steps = range(window.stop, len(sigmas) - 1)
        for i in steps:
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            x = ode_step(x, _velocity(fn, x, s, cond), s, sn)
        return x, len(steps)
    if method != "dpm":
        raise ValueError(f"unknown post-window method {method!r}; expected 'euler' or 'dpm'")
    sched = flash_schedule(sigmas, window.last, ratio)
    x0_prev, sigma_prev = None, None
    for j in range(len(sched) - 1):
        s, sn = float(sched[j]), float(sched[j + 1])
        x0 = x - s * _velocity(fn, x, s, cond)  # x̂0 = x − σ·v
        x = dpmpp_2m_step(x, x0, x0_prev, sigma_prev, s, sn)
        x0_prev, sigma_prev = x0, s
    return x, len(sched) - 1


@torch.no_grad()
def sample_mixed(
    velocity_fn: VelocityFn, noise: Tensor, cond: Cond, sigmas: Tensor, window: Window, *,
    group_size: int, eta: float, sde_kind: SdeKind = "flow", post_window: PostWindow = "euler",
    compress_ratio: float = 1.0, generator: torch.Generator | None = None, sde_noise: Tensor | None = None,
    shared_noise: bool = True,
) -> Trajectory:
    """Sample P groups of G images through one mixed trajectory.

    Args:
        velocity_fn: v_θ(x, σ, cond); called with batch P up to the window's first step and P·G after it
            (batch P·G throughout when the noise is not shared).
        noise: (P, C, H, W) the initial noise of each group, shared by its members; with `shared_noise=False`
            (P·G, C, H, W), each member's own (member j of group p at row p·G + j).
        cond: batch-first conditioning tensors for the P prompts.
        sigmas: (N+1,) schedule from `sigma_schedule`.
        window: SDE steps; must satisfy window.stop <= N−1.
        sde_noise: (P·G, w, C, H, W) the window's ξ; drawn from `generator` when None.
    """
    n = len(sigmas) - 1
    if window.stop > n - 1:
        raise ValueError(f"window {tuple(window)} reaches past the last trainable step {n - 2}")
    g, w = group_size, window.size
    if not shared_noise and noise.shape[0] % g:
        raise ValueError(f"unshared noise needs one row per member (P·G rows, G = {g}), got {noise.shape[0]} rows")
    p = noise.shape[0] if shared_noise else noise.shape[0] // g
    shape = (p * g, w, *noise.shape[1:])  # the window's ξ, checked before any model evaluation
    if sde_noise is None:
        if generator is None:
            raise ValueError("sample_mixed needs sde_noise or a generator")
        sde_noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if sde_noise.shape != shape:
        raise ValueError(f"sde_noise must be shaped {shape}, got {tuple(sde_noise.shape)}")
    x = noise.to(torch.float32)
    cond_g = repeat_cond(cond, g)
    prefix_cond = cond if shared_noise else cond_g
    for i in range(window.start):  # the ODE prefix: batch P when shared, P·G otherwise
        x = ode_step(x, _velocity(velocity_fn, x, float(sigmas[i]), prefix_cond), float(sigmas[i]),
                     float(sigmas[i + 1]))
    # shared: the members are still equal at the window's first step, so its velocity is one per group too
    # (batch P), and the batch branches to P·G with that step's SDE samples
    v_first = _velocity(velocity_fn, x, float(sigmas[window.start]), prefix_cond)
    if shared_noise:
        v_first, x = v_first.repeat_interleave(g, dim=0), x.repeat_interleave(g, dim=0)  # (P·G, C, H, W)
    latents, next_latents, log_probs = [], [], []
    for t, i in enumerate(window.steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        v = v_first if t == 0 else _velocity(velocity_fn, x, s, cond_g)
        step = sde_step(x, v, s, sn, eta=eta, kind=sde_kind, noise=sde_noise[:, t].to(x.device))
        latents.append(x)
        next_latents.append(step.prev_sample)
        log_probs.append(step.log_prob)
        x = step.prev_sample
    x, post_nfe = _post_window(velocity_fn, x, cond_g, sigmas, window, post_window, compress_ratio)
    return Trajectory(
        final=x, latents=torch.stack(latents, 1), next_latents=torch.stack(next_latents, 1),
        log_probs=torch.stack(log_probs, 1), sigmas=sigmas[window.start:window.stop].float(),
        sigmas_next=sigmas[window.start + 1:window.stop + 1].float(),
        nfe=window.start + w + post_nfe,
        image_evals=(p if shared_noise else p * g) * (window.start + 1) + p * g * (w - 1 + post_nfe),
    )


@torch.no_grad()
def sample_branched(
    velocity_fn: VelocityFn, noise: Tensor, cond: Cond, sigmas: Tensor, steps: list[int] | range, *,
    children: int, eta: float, sde_noise: Tensor, sde_kind: SdeKind = "flow", grids: list[Tensor] | None = None,
) -> BranchedTrajectory:
    """Branch `children` SDE samples off each group's deterministic main path at every step of `steps`.

    The main path is Euler from the shared noise (batch P), one velocity per step; at a branch step k that same
    velocity gives the children's SDE mean μ_k(x̄_k), so branching costs no extra evaluation. Each child is then
    finished by Euler on each grid of `grids[j]` (a function of k: see below), batch P·K per branch step.

    Args:
        noise: (P, C, H, W) each group's initial noise.
        steps: the b branch steps, increasing, each < N−1.
        sde_noise: (P, b, K, C, H, W) the children's ξ.
        grids: J finishing grids; `grids[j]` maps k to the σ grid from σ_{k+1} to 0 (None: the rollout schedule
            itself, TempFlow-GRPO; G²RPO passes `family.granularity_grid` at each granularity).
    """
    n, steps = len(sigmas) - 1, list(steps)
    if not steps or steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] > n - 2:
        raise ValueError(f"branch steps must be increasing and in [0, {n - 2}], got {steps}")
    p, b, k = noise.shape[0], len(steps), children
    if sde_noise.shape != (p, b, k, *noise.shape[1:]):
        raise ValueError(f"sde_noise must be shaped {(p, b, k, *noise.shape[1:])}, got {tuple(sde_noise.shape)}")
    grid_fns = grids or [lambda step: granularity_grid(sigmas, step, 1)]
    cond_k = repeat_cond(cond, k)
    x = noise.to(torch.float32)
    branched: dict[int, SdeStep] = {}
    mains: dict[int, Tensor] = {}  # x̄_k repeated for the K children: what the learner's transition starts from
    for i in range(steps[-1] + 1):  # the main path is needed up to the last branch step only
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        v = _velocity(velocity_fn, x, s, cond)
        if i in steps:
            j = steps.index(i)
            mains[i] = x.repeat_interleave(k, 0)
            branched[i] = sde_step(mains[i], v.repeat_interleave(k, 0), s, sn, eta=eta,
                                   kind=sde_kind, noise=sde_noise[:, j].flatten(0, 1).to(x.device))
        x = ode_step(x, v, s, sn)
    finals, longest, evals = [], 0, p * (steps[-1] + 1)
    for fn in grid_fns:
        per_step = []
        for i in steps:
            grid = fn(i)
            y = branched[i].prev_sample
            for a in range(len(grid) - 1):
                y = ode_step(y, _velocity(velocity_fn, y, float(grid[a]), cond_k), float(grid[a]), float(grid[a + 1]))
            per_step.append(y.view(p, k, *y.shape[1:]))
            longest, evals = max(longest, i + len(grid)), evals + p * k * (len(grid) - 1)
        finals.append(torch.stack(per_step, 1).flatten(0, 2))  # (P·b·K, C, H, W)

    def rows(t: Tensor) -> Tensor:  # per-branch (P·K, …) tensors → (P·b·K, …) in row order
        return torch.stack([t_i.view(p, k, *t_i.shape[1:]) for t_i in t], 1).flatten(0, 2)

    step_ids = torch.tensor(steps).view(1, b, 1).expand(p, b, k).flatten()
    return BranchedTrajectory(
        finals=torch.stack(finals), latents=rows([mains[i] for i in steps]).unsqueeze(1),
        next_latents=rows([branched[i].prev_sample for i in steps]).unsqueeze(1),
        log_probs=rows([branched[i].log_prob for i in steps]).unsqueeze(1),
        sigmas=sigmas[step_ids].float().unsqueeze(1), sigmas_next=sigmas[step_ids + 1].float().unsqueeze(1),
        steps=step_ids, nfe=longest, image_evals=evals,
    )


def transition_step(
    velocity_fn: VelocityFn, latents: Tensor, next_latents: Tensor, sigma: Tensor, sigma_next: Tensor,
    cond: Cond, *, eta: float, sde_kind: SdeKind = "flow",
) -> SdeStep:
    """The recorded transition x_i → x_{i+1} under v_θ (learner side), same code as the rollout: its mean μ_θ
    (with gradients), std and log π_θ(x_{i+1} | x_i).

    Args:
        latents, next_latents: (B, C, H, W) x_i and x_{i+1}.
        sigma, sigma_next: (B,) per-row noise levels.
    """
    v = velocity_fn(latents, sigma, cond).to(torch.float32)
    return sde_step(latents, v, sigma, sigma_next, eta=eta, kind=sde_kind, prev_sample=next_latents)


def transition_log_probs(
    velocity_fn: VelocityFn, latents: Tensor, next_latents: Tensor, sigma: Tensor, sigma_next: Tensor,
    cond: Cond, *, eta: float, sde_kind: SdeKind = "flow",
) -> Tensor:
    """(B,) log π_θ(x_{i+1} | x_i) recomputed with gradients: `transition_step(...).log_prob`."""
    return transition_step(velocity_fn, latents, next_latents, sigma, sigma_next, cond, eta=eta,
                           sde_kind=sde_kind).log_prob


@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, noise: Tensor, cond: Cond, sigmas: Tensor) -> Tensor:
    """Deterministic Euler sampling through the whole schedule (evaluation): (B, C, H, W) → (B, C, H, W)."""
    x = noise.to(torch.float32)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        x = ode_step(x, _velocity(velocity_fn, x, s, cond), s, sn)
    return x
