"""One denoising transition x_i (at σ_i) → x_{i+1} (at σ_{i+1}): SDE kinds with log-probs, and the ODE.

All functions take x (B, …) and the model's velocity v (B, …) ≈ ε − x0. `sigma` / `sigma_next` are
Python floats, 0-d tensors, or (B,) tensors (one noise level per sample, as the learner batches
transitions from different steps).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

SdeKind = Literal["flow", "dance", "cps"]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SdeStep(NamedTuple):
    prev_sample: Tensor  # (B, …) x_{i+1}
    mean: Tensor  # (B, …) μ_i; carries gradients to the velocity
    std: Tensor  # (B, 1, …) or 0-d; no gradients
    log_prob: Tensor  # (B,) mean over non-batch elements of log N(x_{i+1}; μ_i, std²)


def per_sample(value: Tensor | float, x: Tensor) -> Tensor:
    """A noise level as a tensor that broadcasts against x: 0-d, or (B,) → (B, 1, …, 1)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or shaped ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """mean_d[−(x−μ)²/(2std²) − log std − ½ log 2π] per sample: (B, …) → (B,).

    Averaged, not summed, over elements (the paper's convention; hence the tiny clip range).
    """
    std = std.expand_as(sample) if std.ndim else std
    elem = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return elem.flatten(1).mean(dim=1)


def _noise_scale(kind: SdeKind, sigma: Tensor, sigma_next: Tensor, eta: float) -> Tensor:
    """g_i: flow: η·sqrt(σ/(1−σ̃)) with σ̃ = σ_next where σ = 1 (no division by 0); dance: η."""
    if kind == "dance":
        return torch.full_like(sigma, eta)
    sigma_tilde = torch.where(sigma >= 1.0, sigma_next, sigma)
    return eta * torch.sqrt(sigma / (1.0 - sigma_tilde))


def sde_mean_std(
    x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *, eta: float,
    kind: SdeKind = "flow",
) -> tuple[Tensor, Tensor]:
    """Mean μ_i (B, …) and std (broadcastable) of the transition distribution."""
    s, sn = per_sample(sigma, x), per_sample(sigma_next, x)
    if torch.any(s <= 0) or torch.any(sn >= s):
        raise ValueError("an SDE step needs sigma > sigma_next >= 0 and sigma > 0")
    eps_hat = x + (1.0 - s) * velocity  # ε̂
    if kind == "cps":
        x0_hat = x - s * velocity
        std = sn * math.sin(eta * math.pi / 2)
        return (1.0 - sn) * x0_hat + torch.sqrt(sn**2 - std**2) * eps_hat, std
    if kind not in ("flow", "dance"):
        raise ValueError(f"unknown SDE kind {kind!r}; expected flow, dance or cps")
    delta = s - sn
    g = _noise_scale(kind, s, sn, eta)
    mean = x - delta * (velocity + g**2 / (2.0 * s) * eps_hat)
    return mean, g * torch.sqrt(delta)


def sde_step(
    x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *, eta: float,
    kind: SdeKind = "flow", noise: Tensor | None = None, prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SdeStep:
    """One stochastic transition and its log-probability.

    Args:
        x, velocity: (B, …) fp32.
        noise: (B, …) standard normal ξ; x_{i+1} = μ + std·ξ.
        prev_sample: (B, …) an already sampled x_{i+1} whose log-prob is wanted (learner side).
        generator: draws ξ when neither noise nor prev_sample is given (no hidden randomness).
    """
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, eta=eta, kind=kind)
    if prev_sample is None:
        if noise is None:
            if generator is None:
                raise ValueError("sde_step needs noise, prev_sample or a generator")
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = (mean + std * noise).detach()
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return SdeStep(prev_sample, mean, std_t, gaussian_log_prob(prev_sample, mean, std_t))


def ode_step(x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Euler step of the flow ODE: x_{i+1} = x_i − Δ_i·v.  (B, …) → (B, …)."""
    return x - (per_sample(sigma, x) - per_sample(sigma_next, x)) * velocity
