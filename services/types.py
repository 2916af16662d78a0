"""Data that crosses process boundaries between rollout workers, the driver and the learner.

Latents and log-probs are fp32 (bf16 storage breaks ratio = 1 at the first update). Inside Ray these
travel through the object store, their tensors as raw bytes (services/wire.py); over HTTP only JSON is used
(see reward_servers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from services.wire import reduce_dataclass


@dataclass
class RolloutBatch:
    """The window transitions of whole groups, their rewards, and what produced them.

    B = groups × group_size rows, group members adjacent; w window steps.

    Branched rollouts (TempFlow-GRPO, G²RPO: `sampler.branching`) hold one SDE transition per row (w = 1) at the
    row's own step: `steps` (B,) says which, `sigmas` / `sigmas_next` are per row (B, 1), and each prompt's
    group_size rows are `branches` advantage groups of group_size / branches members (one per branch step).
    G²RPO's rows have one reward per finishing granularity: rewards (B, J).
    """

    prompts: list[str]  # (P,) one per group
    prompt_ids: list[int]  # (P,) global index of each group in the iteration (for seeding and dedup)
    group_size: int
    latents: Tensor  # (B, w, C, H, W) fp32, x_i
    next_latents: Tensor  # (B, w, C, H, W) fp32, x_{i+1}
    log_probs: Tensor  # (B, w) fp32, log π_old
    sigmas: Tensor  # (w,) fp32, or (B, w) per row (branched)
    sigmas_next: Tensor  # (w,) fp32, or (B, w)
    rewards: dict[str, Tensor]  # name → (B,) fp32, or (B, J) one per finishing grid (G²RPO)
    cond: dict[str, Tensor]  # (P, …) per group: the conditioning the rollout used (the learner reuses it)
    window: tuple[int, int]  # (start, size)
    iteration: int
    weight_version: int
    nfe: int
    image_evals: int
    images: np.ndarray | None = None  # (k, H, W, 3) uint8, a few for logging (`rollout.log_images`)
    image_prompts: list[str] = field(default_factory=list)
    image_rows: list[int] = field(default_factory=list)  # (k,) the row each of `images` is (its rewards)
    timings: dict[str, float] = field(default_factory=dict)
    final_latents: Tensor | None = None  # (B, C, H, W) fp32, each row's x_0: AWM's targets (None unless asked for)
    branches: int = 1  # advantage groups per prompt (branched rollouts: the branch steps)
    steps: Tensor | None = None  # (B,) long, each row's trajectory step (branched rollouts)

    def __reduce__(self):  # tensors as raw bytes through the object store (services/wire.py)
        return reduce_dataclass(self)

    def __post_init__(self) -> None:
        b, w = self.log_probs.shape
        if b != len(self.prompts) * self.group_size:
            raise ValueError(f"{b} rows for {len(self.prompts)} groups of {self.group_size}")
        for name, t in {"latents": self.latents, "next_latents": self.next_latents, "log_probs": self.log_probs}.items():
            if t.dtype != torch.float32:
                raise TypeError(f"RolloutBatch.{name} must be fp32, got {t.dtype}")
        if self.final_latents is not None and (self.final_latents.dtype != torch.float32
                                               or self.final_latents.shape[0] != b):
            raise ValueError(f"RolloutBatch.final_latents must be {b} fp32 rows, got "
                             f"{self.final_latents.dtype} {tuple(self.final_latents.shape)}")
        if self.group_size % self.branches:
            raise ValueError(f"group_size {self.group_size} is not {self.branches} branches of equal size")
        if self.sigmas.shape not in ((w,), (b, w)) or self.sigmas_next.shape != self.sigmas.shape:
            raise ValueError(f"sigmas must be ({w},) or ({b}, {w}), got {tuple(self.sigmas.shape)} and "
                             f"{tuple(self.sigmas_next.shape)}")
        if self.steps is not None and self.steps.shape != (b,):
            raise ValueError(f"RolloutBatch.steps must be ({b},), got {tuple(self.steps.shape)}")
        for name, r in self.rewards.items():
            if r.ndim not in (1, 2) or r.shape[0] != b or not torch.isfinite(r).all():
                raise ValueError(f"reward {name!r} must be {b} finite values (or {b} rows of them), got shape "
                                 f"{tuple(r.shape)}")

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with its model inputs (latents, log-probs, sigmas, conditioning) on `device`; a no-op
        copy on the device it is on. Rewards stay where they are (advantages are computed on the CPU)."""
        if all(t.device == torch.device(device) for t in (self.latents, *self.cond.values())):
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, latents=move(self.latents), next_latents=move(self.next_latents), log_probs=move(self.log_probs),
            sigmas=move(self.sigmas), sigmas_next=move(self.sigmas_next),
            cond={k: move(v) for k, v in self.cond.items()},
            final_latents=None if self.final_latents is None else move(self.final_latents))

    @property
    def num_rows(self) -> int:
        return self.log_probs.shape[0]

    def logged_samples(self, k: int) -> dict | None:
        """Up to `k` of the logged images, spread over the batch, with their prompts and rewards (name → one
        float per image; G²RPO's per-grid rewards averaged): what the driver hands its observers (TensorBoard's
        and wandb's "samples/rollout"). None without images."""
        if self.images is None or not len(self.images) or k <= 0:
            return None
        pick = spread(len(self.images), k)
        rows = [self.image_rows[i] for i in pick] if self.image_rows else []
        rewards = {n: [float(r[j].float().mean()) for j in rows] for n, r in self.rewards.items()} if rows else {}
        return {"images": self.images[pick], "prompts": [self.image_prompts[i] for i in pick], "rewards": rewards}


def spread(n: int, k: int) -> list[int]:
    """min(k, n) indices spread evenly over range(n), the first one 0."""
    k = min(k, n)
    return [i * n // k for i in range(k)]


def merge_batches(batches: list[RolloutBatch], num_groups: int | None = None) -> RolloutBatch:
    """Concatenate the groups of several workers' batches (same iteration, window and version).

    Every group id must appear once; with `num_groups`, the ids must be exactly 0…num_groups-1 (after a
    worker failure and re-runs, no group may be lost or counted twice).
    """
    if not batches:
        raise ValueError("no rollout batches to merge")
    first = batches[0]
    for b in batches[1:]:
        if (b.iteration, b.window, b.group_size, b.branches) != (first.iteration, first.window, first.group_size,
                                                                 first.branches):
            raise ValueError("rollout batches from different iterations or windows cannot be merged")
    order = np.argsort([pid for b in batches for pid in b.prompt_ids], kind="stable")
    prompts = [p for b in batches for p in b.prompts]
    ids = [i for b in batches for i in b.prompt_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate groups across rollout batches: {sorted(ids)}")
    if num_groups is not None and sorted(ids) != list(range(num_groups)):
        missing = sorted(set(range(num_groups)) - set(ids))
        raise ValueError(f"rollout batches hold groups {sorted(ids)}, expected 0…{num_groups - 1} "
                         f"(missing {missing})")
    g = first.group_size
    rows = torch.as_tensor(np.concatenate([np.arange(k * g, (k + 1) * g) for k in order]), dtype=torch.long)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(b, name) for b in batches])[rows]

    images = [b.images for b in batches if b.images is not None and len(b.images)]
    # the logged images' rows: shard b's row r is row offset_b + r of the concatenation, then moved by `rows`
    new_row = torch.empty(len(rows), dtype=torch.long)
    new_row[rows] = torch.arange(len(rows))
    offsets = np.cumsum([0] + [b.num_rows for b in batches])
    image_rows = [int(new_row[o + r]) for b, o in zip(batches, offsets, strict=False) if b.images is not None
                  and len(b.images) for r in b.image_rows]
    image_prompts = [p for b in batches for p in b.image_prompts]
    if images and len(image_rows) == sum(len(i) for i in images):  # in the merged batch's row order
        by_row = np.argsort(image_rows, kind="stable")
        images = [np.concatenate(images)[by_row]]
        image_rows, image_prompts = [image_rows[i] for i in by_row], [image_prompts[i] for i in by_row]
    else:
        image_rows = []
    return RolloutBatch(
        prompts=[prompts[k] for k in order], prompt_ids=[ids[k] for k in order], group_size=g,
        latents=cat("latents"), next_latents=cat("next_latents"), log_probs=cat("log_probs"),
        sigmas=first.sigmas if first.sigmas.ndim == 1 else cat("sigmas"),
        sigmas_next=first.sigmas_next if first.sigmas_next.ndim == 1 else cat("sigmas_next"),
        rewards={n: torch.cat([b.rewards[n] for b in batches])[rows] for n in first.rewards},
        cond={k: torch.cat([b.cond[k] for b in batches])[torch.as_tensor(order)] for k in first.cond},
        window=first.window, iteration=first.iteration, weight_version=min(b.weight_version for b in batches),
        nfe=first.nfe, image_evals=sum(b.image_evals for b in batches),
        images=np.concatenate(images) if images else None,
        image_prompts=image_prompts, image_rows=image_rows,
        # the slowest shard's seconds (the workers run side by side); CPU seconds add up over the workers, and so do
        # the model's forward seconds in "forward_sum_s" (beside the slowest worker's "forward_s": their gap is the
        # workers' imbalance)
        timings={**{k: (sum if k == "cpu_s" else max)(b.timings.get(k, 0.0) for b in batches) for k in first.timings},
                 **({"forward_sum_s": sum(b.timings["forward_s"] for b in batches)} if "forward_s" in first.timings
                    else {})},
        final_latents=None if first.final_latents is None else cat("final_latents"),
        branches=first.branches, steps=None if first.steps is None else cat("steps"),
    )
