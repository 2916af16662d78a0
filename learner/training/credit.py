"""How each method turns a rollout batch's rewards into per-row credit: advantages, and TempFlow-GRPO's weights.

- window rollouts (MixGRPO, Flow-GRPO, DanceGRPO): group-relative z-scores per reward, aggregated (advantages.py),
  scaled by each group's std or (`advantage_std="global"`, Flow-GRPO) the whole batch's;
- AWM / DiffusionNFT: the weighted reward centred per group and scaled by the batch's std (family.py);
- TempFlow-GRPO: z-scores (population std + 1e-4) over the K children of each (main path, branch step), one process
  reward each, and each row's loss weighted by its branch step's SDE std over the mean std;
- G²RPO: z-scores (unbiased std) over the K children of each (prompt, SDE step), per finishing granularity and
  reward, summed over both and clipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from learner.algo import batch_std_advantages, combine_advantages, sde_mean_std
from learner.algo.family import integrated_advantages, noise_aware_weights, tempflow_advantages
from services.types import RolloutBatch


def batch_advantages(batch: RolloutBatch, reward_weights: Mapping[str, float], *, branching: str = "none",
                     aggregation: str = "advantage", advantage_std: str = "group", matching: bool = False,
                     adv_clip_max: float = 5.0) -> torch.Tensor:
    """(B,) advantages of the batch's rows. Refuses a batch of the other rollout shape, naming the setting."""
    p, g = len(batch.prompts), batch.group_size
    if (branching != "none") != (batch.steps is not None):
        raise ValueError(f"a {'branched' if batch.steps is not None else 'window'} rollout batch reached a learner "
                         f"with sampler.branching={branching}")
    if branching == "tempflow":
        k = g // batch.branches
        return tempflow_advantages({n: r.view(-1, k) for n, r in batch.rewards.items()}, reward_weights).flatten()
    if branching == "granular":
        k, names = g // batch.branches, list(batch.rewards)
        if any(batch.rewards[n].ndim != 2 for n in names):
            raise ValueError("G²RPO needs one reward per finishing granularity: rewards shaped (B, J)")
        stacked = torch.stack([batch.rewards[n].view(-1, k, batch.rewards[n].shape[1]).permute(2, 0, 1)
                               for n in names], 1)  # (J, R, P·b, K)
        return integrated_advantages(stacked, reward_weights=torch.tensor([reward_weights[n] for n in names]),
                                     clip=adv_clip_max).flatten()
    per_reward = {n: r.view(p, g) for n, r in batch.rewards.items()}
    if matching:
        total = sum(reward_weights.values())
        return batch_std_advantages(sum(reward_weights[n] * r for n, r in per_reward.items()) / total,
                                    clip=adv_clip_max).flatten()
    return combine_advantages(per_reward, reward_weights, aggregation=aggregation, std=advantage_std).flatten()


def noise_aware_row_weights(batch: RolloutBatch, *, eta: float, sde_kind: str) -> torch.Tensor:
    """(B,) w = s_k / mean_j s_j: s_k the SDE std of the row's branch step, the mean over the batch's branch steps
    (METHODS.md §1; the reference multiplies by a constant 2.25·s_k instead, ≈ this at N = 10)."""
    sig, sig_next, steps = batch.sigmas[:, 0].cpu(), batch.sigmas_next[:, 0].cpu(), batch.steps.cpu()
    x = torch.zeros(len(sig), 1)
    stds = torch.as_tensor(sde_mean_std(x, x, sig, sig_next, eta=eta, kind=sde_kind)[1]).expand(len(sig), 1).flatten()
    uniq, inverse = torch.unique(steps, return_inverse=True)
    per_step = torch.stack([stds[steps == k][0] for k in uniq])
    return noise_aware_weights(per_step)[inverse]
