"""The evaluation sampler: full-step Euler ODE from seeded noise, optionally hybrid (trained, then base).

Hybrid inference (MixGRPO paper, Sec. "hybrid inference"): the trained model integrates the first
round(F·N) ODE steps, where the layout is decided, and the base model the rest; F = 1 is the trained
model alone, F = 0 the base alone. Both segments continue one trajectory from the same seeded noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learner.algo import sample_ode, sigma_schedule


def initial_noise(latent_shape: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """(n, C, H, W) standard normal noise drawn at once from a generator seeded with `seed`, so a prompt's
    image depends on its position in the list, not on the batch size it is sampled with."""
    return torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(policy, prompts: Sequence[str], *, num_steps: int, shift: float, seed: int = 0,
                  noise: torch.Tensor | None = None, base=None, fraction: float = 1.0,
                  batch_size: int = 64) -> np.ndarray:
    """One image per prompt → uint8 (P, H, W, 3).

    `policy` (and `base`) have `encode_prompts`, `velocity`, `decode`, `latent_shape` and `device`. The
    initial noise is `noise` (P, C, H, W) when given, else `initial_noise(policy.latent_shape, P, seed)`.
    With `base` and `fraction` < 1, `base` integrates the steps after the first round(fraction·N).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hybrid fraction must be in [0, 1], got {fraction}")
    if fraction < 1.0 and base is None:
        raise ValueError("a hybrid fraction below 1 needs the base model")
    if noise is None:
        noise = initial_noise(policy.latent_shape, len(prompts), seed)
    elif noise.shape[0] != len(prompts):
        raise ValueError(f"noise holds {noise.shape[0]} samples for {len(prompts)} prompts")
    sigmas = sigma_schedule(num_steps, shift)  # (N+1,)
    k = round(fraction * num_steps)
    images = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        x = noise[lo:lo + batch_size].to(policy.device)  # (b, C, H, W)
        if k > 0:
            x = sample_ode(policy.velocity, x, policy.encode_prompts(chunk), sigmas[:k + 1])
        if k < num_steps:
            x = sample_ode(base.velocity, x, base.encode_prompts(chunk), sigmas[k:])
        images.append(policy.decode(x))  # (b, H, W, 3)
    return np.concatenate(images, axis=0)


class AdapterOff:
    """The base model of a LoRA policy without a second copy: its velocity with the adapter disabled."""

    def __init__(self, policy) -> None:
        self.policy, self.latent_shape, self.device = policy, policy.latent_shape, policy.device

    def encode_prompts(self, prompts: Sequence[str]):
        return self.policy.encode_prompts(prompts)

    def velocity(self, x, sigma, cond):
        self.policy.transformer.disable_adapters()
        try:
            return self.policy.velocity(x, sigma, cond)
        finally:
            self.policy.transformer.enable_adapters()

    def decode(self, x) -> np.ndarray:
        return self.policy.decode(x)
