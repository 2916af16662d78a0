"""DPM-Solver++ (2M, midpoint) on the flow-matching ODE, used after the window by MixGRPO-Flash.

With α(σ) = 1 − σ and λ(σ) = log(α/σ), the model output is converted to x̂0 = x − σ·v. Agrees with
diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", prediction_type="flow_prediction", use_flow_sigmas=True) on the same sigmas.
"""

from __future__ import annotations

import math

from torch import Tensor


def _lam(sigma: float) -> float:
    return math.log((1.0 - sigma) / sigma)


def dpmpp_2m_step(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, sigma_prev: float | None, sigma: float, sigma_next: float
) -> Tensor:
    """One DPM-Solver++ 2M step σ_s0 = sigma → σ_t = sigma_next.

    Args:
        x: (B, …) sample at `sigma`.
        x0: (B, …) x̂0 predicted at `sigma`.
        x0_prev: (B, …) x̂0 predicted at the previous point `sigma_prev`, or None for a first-order step.
    Returns:
        (B, …) sample at `sigma_next`; exactly x0 when sigma_next = 0.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not 0.0 < sigma < 1.0 or not 0.0 <= sigma_next < sigma:
        raise ValueError(f"dpmpp_2m_step needs 1 > sigma > sigma_next >= 0, got {sigma} → {sigma_next}")
    if sigma_next == 0.0:
        return x0  # λ_t = ∞: the first-order update collapses to x̂0
    h = _lam(sigma_next) - _lam(sigma)
    d = x0
    if x0_prev is not None:
        if sigma_prev is None or not sigma < float(sigma_prev) < 1.0:
            raise ValueError(f"second-order step needs sigma < sigma_prev < 1, got {sigma_prev}")
        r0 = (_lam(sigma) - _lam(float(sigma_prev))) / h
        d = (1.0 + 1.0 / (2.0 * r0)) * x0 - (1.0 / (2.0 * r0)) * x0_prev
    alpha_t = 1.0 - sigma_next
    return (sigma_next / sigma) * x - alpha_t * math.expm1(-h) * d
