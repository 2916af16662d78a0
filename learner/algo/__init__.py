"""MixGRPO's math as pure torch functions (no Ray, no config objects, no I/O, no hidden randomness).

Notation (arXiv 2507.21802; ../shared/docs/ALGORITHM.md):
- σ ∈ [0, 1] is the noise level, 1 = pure noise. x_σ = (1−σ)·x0 + σ·ε; the model predicts the velocity
  v ≈ ε − x0, so x̂0 = x − σ·v and ε̂ = x + (1−σ)·v.
- Steps i = 0 … N−1 go from noise to data; step i maps x_i at σ_i to x_{i+1} at σ_{i+1};
  Δ_i = σ_i − σ_{i+1}. The window W(l) = {l, …, l+w−1} holds the SDE (trained) steps.
- Shapes in docstrings: B batch, P prompts, G group size, T or w window steps, (C, H, W) latents.

Where this departs from the reference code (Tencent-Hunyuan/MixGRPO, yifan123/flow_grpo,
XueZeyue/DanceGRPO), on purpose:
1. CPS log-probs are the true Gaussian log-density (the reference uses an unscaled negative MSE).
2. Log-probs and window latents are fp32 everywhere (bf16 storage breaks ratio = 1 at the first update).
3. The pre-window ODE prefix is computed once per group, not once per member (same result: the members
   share their initial noise; saves (G−1)·l model evaluations per group).
4. The Flash schedule uses P = max(⌊(N − last)·r⌋, 1) post-window points (this reproduces the paper's
   reported 8 NFE for Flash*); the paper's closed form l + w + ⌈(N−w−l)·r⌉ differs from it by at most 1.
5. The final step (to σ = 0) is never stochastic or trained, so windows end at step N−2 at the latest.
   DanceGRPO's reference does the same in effect (its last SDE sample is discarded: the image is that step's
   x̂0); Flow-GRPO's samples its last step with the SDE and decodes that noisy sample (untrained).
6. The `random` window strategy derives its draw from (run seed, iteration) so every worker and a
   restarted run agree without communicating. Every seeded draw of a run goes through `seeding.py`.
"""

from .advantages import combine_advantages, global_std_advantages, group_advantages
from .dpm import dpmpp_2m_step
from .family import batch_std_advantages, lagged_update
from .loss import grpo_loss, kl_penalty
from .sampler import Trajectory, repeat_cond, sample_mixed, sample_ode, transition_log_probs, transition_step
from .schedule import flash_schedule, infer_shift, shift_sigma, sigma_schedule
from .seeding import Stream, mix_seed, seeded_generator
from .transitions import SdeStep, gaussian_log_prob, ode_step, sde_mean_std, sde_step
from .window import STRATEGIES, Window, window_at

__all__ = [
    "STRATEGIES", "SdeStep", "Stream", "Trajectory", "Window", "batch_std_advantages", "combine_advantages", "dpmpp_2m_step",
    "flash_schedule", "gaussian_log_prob", "global_std_advantages", "group_advantages", "grpo_loss", "infer_shift", "kl_penalty", "lagged_update", "mix_seed", "ode_step",
    "repeat_cond", "sample_mixed", "sample_ode", "sde_mean_std", "sde_step", "seeded_generator", "shift_sigma",
    "sigma_schedule", "transition_log_probs", "transition_step", "window_at",
]
