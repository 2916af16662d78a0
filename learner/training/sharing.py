"""The group's common first window step, computed once per group in the learner as in the rollout.

The G members of a group start the window from the same x_l (shared noise, deterministic prefix), so the first
window step's velocity v_θ(x_l, σ_l, c) is the same for all of them; only x_{l+1}, and so each member's
log-probability and loss, differ. A micro-batch that holds several members of a group computes that velocity
once and hands it to each of them (`shared_velocity`); autograd sums the members' gradients into the one
forward, so the loss and its gradient are the ones of the unshared computation. Branched rollouts (TempFlow-GRPO,
G²RPO) share the same way: the K children of a branch step leave the group's main-path x̄_k together.

How many members meet in a micro-batch depends on the update order (`update_order`): `by_group` keeps each
group's rows together, as MixGRPO's reference does (Tencent-Hunyuan/MixGRPO `fastvideo/train_grpo_flux.py`
`train_one_step`: each rank steps through its group's members in order, an optimizer step every
`gradient_accumulation_steps` of them); `shuffled` deals all rows in one random order.

Sharing is claimed from the batch's structure (same group, same σ, a step the members start together) and then
checked: an input is only shared when it equals the group's first one exactly (`torch.equal`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

UPDATE_ORDERS = ("shuffled", "by_group")


def update_order(num_rows: int, group_size: int, generator: torch.Generator, order: str) -> Tensor:
    """(num_rows,) the rows in the order the update takes them: all shuffled, or the groups shuffled with each
    group's rows together (in batch order)."""
    if order == "shuffled":
        return torch.randperm(num_rows, generator=generator)
    if order != "by_group":
        raise ValueError(f"unknown update order {order!r}; expected one of {UPDATE_ORDERS}")
    if num_rows % group_size:
        raise ValueError(f"{num_rows} rows are not whole groups of {group_size}")
    groups = torch.randperm(num_rows // group_size, generator=generator)
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


@dataclass(frozen=True)
class Sharing:
    """Which of n inputs are computed (`unique`, m ≤ n indices) and which computed row each input takes
    (`inverse`, n indices into the m)."""

    unique: Tensor
    inverse: Tensor

    @property
    def saved(self) -> int:
        return len(self.inverse) - len(self.unique)


def shared_inputs(x: Tensor, sigma: Tensor, groups: Tensor, candidate: Tensor) -> Sharing:
    """The exact repeats among n inputs of one forward.

    Args:
        x: (n, …) the inputs; sigma: (n,) their noise levels; groups: (n,) each input's group (same conditioning).
        candidate: (n,) bool, the inputs whose members may start together (the window's first step; every
            branched transition). Others are always computed.
    """
    n = len(x)
    inverse = torch.arange(n)
    first: dict[tuple[int, float], int] = {}
    keys = list(zip(groups.tolist(), sigma.tolist(), strict=True))  # one transfer, not one per input (GPU)
    for i in torch.nonzero(candidate.cpu()).flatten().tolist():
        key = keys[i]
        j = first.setdefault(key, i)
        if j != i and torch.equal(x[i], x[j]):
            inverse[i] = j
    unique, slot = torch.unique(inverse, return_inverse=True)  # the computed positions; each input's among them
    return Sharing(unique=unique.to(x.device), inverse=slot.to(x.device))


VelocityFn = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def shared_velocity(fn: VelocityFn, sharing: Sharing) -> VelocityFn:
    """fn evaluated on the unique inputs only, expanded back to every input (gradients flow through the gather)."""
    if not sharing.saved:
        return fn

    def velocity(x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        u = sharing.unique
        return fn(x[u], sigma[u], {k: v[u] for k, v in cond.items()})[sharing.inverse]

    return velocity
