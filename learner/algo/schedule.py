"""Sigma schedules: the shifted schedule of SD3/FLUX and the compressed post-window schedule of Flash."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shift_sigma(u: Tensor | float, shift: float) -> Tensor:
    """Timestep shift σ = s·u / (1 + (s−1)·u), applied elementwise to unshifted times u ∈ [0, 1]."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def sigma_schedule(num_steps: int, shift: float) -> Tensor:
    """σ_0 = 1 … σ_N = 0 for N steps with timestep shift s.

    Returns:
        (N+1,) float64. u_k = 1 − k/N, σ_k = s·u_k / (1 + (s−1)·u_k). float64 so that
        differences Δ_i = σ_i − σ_{i+1} keep their precision; callers cast when stepping.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return shift_sigma(u, shift)


def infer_shift(sigmas: Tensor) -> float:
    """Recover s from a schedule made by `sigma_schedule` (the map u → σ is a Möbius map)."""
    n = len(sigmas) - 1
    k = max(1, n // 2)
    u, s = 1.0 - k / n, float(sigmas[k])
    shift = s * (1.0 - u) / (u * (1.0 - s))
    if not torch.allclose(sigmas.double(), sigma_schedule(n, shift), atol=1e-6):
        raise ValueError("sigmas is not a shifted uniform schedule; pass shift= explicitly")
    return shift


def flash_schedule(
    sigmas: Tensor, last_window_step: int, compress_ratio: float, *, shift: float | None = None
) -> Tensor:
    """Compressed schedule that DPM-Solver++ follows after the window (MixGRPO-Flash).

    With `last` the last window step and N = len(sigmas) − 1: P = max(⌊(N − last)·r⌋, 1) points
    u_j = u*·(1 − j/P), j = 0 … P−1, from u* = 1 − (last+1)/N, shifted like `sigmas`, then 0.
    The first point equals σ_{last+1}, so window transitions (and their log-probs) are unchanged.

    Args:
        sigmas: (N+1,) the full schedule from `sigma_schedule`.
    Returns:
        (P+1,) float64, from σ_{last+1} down to 0: P post-window steps, P model evaluations.
    """
    n = len(sigmas) - 1
    if not 0 <= last_window_step <= n - 2:
        raise ValueError(f"last_window_step must be in [0, {n - 2}] for {n} steps, got {last_window_step}")
    if not 0.0 < compress_ratio <= 1.0:
        raise ValueError(f"compress_ratio must be in (0, 1], got {compress_ratio}")
    shift = infer_shift(sigmas) if shift is None else shift
    points = max(math.floor((n - last_window_step) * compress_ratio), 1)
    u_start = 1.0 - (last_window_step + 1) / n
    u = u_start * (1.0 - torch.arange(points, dtype=torch.float64) / points)
    out = torch.cat([shift_sigma(u, shift), torch.zeros(1, dtype=torch.float64)])
    out[0] = sigmas[last_window_step + 1]  # exact, not just equal up to rounding
    return out
