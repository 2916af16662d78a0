"""The matching objectives, computed by the same Learner on the same rollout batches as GRPO's clipped ratio.

Both keep only each row's final latent x0 and its conditioning: no log-probs, so any sampler serves (the rollout's
SDE steps only give a group's members, who share their initial noise, their diversity). Per micro-batch the learner
draws T training times stratified over the rollout's σ grid (shared by the micro-batch) and a fresh ε per
(row, time), and re-noises x_t = (1−t)·x0 + t·ε.

- AWM (advantage-weighted matching, METHODS.md §3; scxue/advantage_weighted_matching): the flow-matching error of
  v_θ(x_t, t) weighted by the advantage, −Ā·exp(ψ − sg ψ); with `lagged_beta` > 0 plus lagged_beta·mean_d (v_θ − v_φ)²
  to a lagged copy φ (the reference's "ema" adapter, scripts/train_sd3_awm.py: ema_beta = 1, decay
  min(0.001·step, 0.3) after each epoch), which the workers do not sample with.
- DiffusionNFT (METHODS.md §4; NVlabs/DiffusionNFT): the implicit positive and negative policies around a lagged
  "old" policy φ (v_old, no gradient), weighted by r = clip(A)/10 + ½. φ is learner state: the rollout workers
  sample with it (it is what the learner publishes), it is checkpointed, and after each iteration
  φ ← d·φ + (1−d)·θ with d = min(rate·iteration, cap).

Every draw comes from `seeding.py` keyed by (run seed, stream, iteration, epoch, micro-batch), so K learner ranks
(each computing some micro-batches) and a resumed run draw exactly what one uninterrupted learner draws.
Departure from the references, stated: their times are drawn per sample (AWM: T stratified per micro-batch as
here); NFT's are drawn here as AWM's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from learner.algo import Stream, seeded_generator, sigma_schedule
from learner.algo.family import (
    awm_loss,
    flow_matching_error,
    lagged_decay,
    nft_loss,
    nft_optimality,
    noised,
    stratified_indices,
    velocity_kl,
)
from services.types import RolloutBatch

NFT_DECAY_RATE = 0.001  # d = min(0.001·iteration, cap), as DiffusionNFT's and AWM's references
AWM_DECAY_CAP = 0.3  # AWM's reference: kl_ema_decay = 0.3, linear


@dataclass(frozen=True)
class MatchingSpec:
    kind: Literal["awm", "nft"] = "awm"
    times: int = 6  # T stratified training times per micro-batch
    num_steps: int = 16  # the rollout's N and shift: the σ grid the times are drawn from
    shift: float = 3.0
    weighting: Literal["uniform", "ghuber"] = "ghuber"  # AWM's ψ
    beta: float = 1.0  # NFT's β (the implicit policies' step)
    decay_cap: float = 0.5  # the lagged copy's d = min(rate·iteration, cap) (NFT 0.5, AWM 0.3)
    lagged_beta: float = 0.0  # AWM: weight of mean_d (v_θ − v_φ)² (0: no lagged copy)
    adv_clip: float = 5.0  # grpo.adv_clip_max: AWM's Ā = clip(A, ±c)/c, NFT's r = clip(A, ±c)/(2c) + ½ (references: 5)

    @property
    def has_lagged(self) -> bool:
        """Whether the learner keeps a lagged copy φ: NFT always (the workers sample with it), AWM when regularised."""
        return self.kind == "nft" or self.lagged_beta > 0

    def grid(self) -> torch.Tensor:
        """σ_0 … σ_{N−1} (σ = 0 is no training time: x_0 itself)."""
        return sigma_schedule(self.num_steps, self.shift)[:-1].float()

    def decay(self, iteration: int) -> float:
        return lagged_decay(iteration, rate=NFT_DECAY_RATE, cap=self.decay_cap)


def check_options(objective: str, matching: MatchingSpec | None, branching: str, train_selection: str,
                  matching_aux: float, aux: MatchingSpec | None) -> None:
    """The Learner's combinations of objective, matching spec, branching, step selection and matching term that
    exist (the config refuses the others earlier, naming the fields); ValueError otherwise."""
    if objective not in ("grpo", "awm", "nft") or (objective != "grpo") != (matching is not None) or (
            matching is not None and matching.kind != objective):
        raise ValueError(f"objective {objective!r} with {matching!r}: expected grpo, or awm / nft with its spec")
    if branching not in ("none", "tempflow", "granular") or (branching != "none" and objective != "grpo"):
        raise ValueError(f"branching {branching!r} with objective {objective!r}: expected none, or tempflow / "
                         "granular with grpo")
    if train_selection not in ("per_iteration", "per_sample") or (
            train_selection == "per_sample" and (objective != "grpo" or branching != "none")):
        raise ValueError(f"train_selection {train_selection!r} with objective {objective!r}, branching "
                         f"{branching!r}: expected per_iteration, or per_sample with grpo and no branching")
    if (matching_aux > 0) != (aux is not None) or (aux is not None and (
            aux.kind != "awm" or aux.has_lagged or objective != "grpo" or branching != "none")):
        raise ValueError(f"matching_aux {matching_aux} with {aux!r}: expected 0 and None, or > 0 with a plain AWM "
                         "spec under the grpo objective without branching")


def matching_times(spec: MatchingSpec, seed: int, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ-grid indices (T,), σ values (T,)) of one micro-batch's stratified draws."""
    idx = stratified_indices(spec.num_steps, spec.times, seeded_generator(seed, Stream.AWM_TIMES, *key))
    return idx, spec.grid()[idx]


def old_velocity(policy, lagged: Mapping[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """v_old: the velocity with the lagged weights φ swapped in, no gradient; θ is put back before returning
    (call it before the forward that builds θ's graph)."""
    with torch.no_grad():
        theta = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        policy.load_trainable_state_dict(lagged)
        try:
            return policy.velocity(x, t, cond).float()
        finally:
            policy.load_trainable_state_dict(theta)


def matching_inputs(batch: RolloutBatch, cond: dict, rows: torch.Tensor, slots: list[int], *, spec: MatchingSpec,
                    seed: int, key: tuple[int, ...]):
    """The re-noised final images of `rows` at the time draws `slots` (indices into the micro-batch's T draws), rows
    outer, draws inner: (x0, ε, t, x_t, cond), each mb·k rows, from the run's seeded streams."""
    if batch.final_latents is None:
        raise ValueError(f"the {spec.kind} objective needs the rollout's final latents (RolloutBatch.final_latents); "
                         f"rollout workers keep them when grpo.objective={spec.kind}")
    device = batch.final_latents.device
    _, sig = matching_times(spec, seed, key)
    x0 = batch.final_latents[rows]  # (mb, C, H, W)
    eps = torch.randn((len(rows), spec.times, *x0.shape[1:]), generator=seeded_generator(seed, Stream.AWM_NOISE, *key))
    k, mb = len(slots), len(rows)
    idx = torch.as_tensor(slots)
    t = sig[idx].repeat(mb).to(device)  # (mb·k,): rows outer, draws inner
    eps = eps[:, idx].flatten(0, 1).to(device)
    x0 = x0.repeat_interleave(k, 0)
    c = {n: v[rows].repeat_interleave(k, 0) for n, v in cond.items()}
    return x0, eps, t, noised(x0, eps, t), c


def matching_micro_loss(policy, batch: RolloutBatch, cond: dict, rows: torch.Tensor, slots: list[int],
                        adv: torch.Tensor, *, spec: MatchingSpec, seed: int, key: tuple[int, ...], kl_beta: float = 0.0,
                        lagged: Mapping[str, torch.Tensor] | None = None):
    """AWM's or NFT's loss on `rows` × the time draws `slots` (`matching_inputs`; a micro-batch can be split across
    backwards). -> (loss, metrics in the Learner's keys; no ratio: reported as 1)."""
    x0, eps, t, x_t, c = matching_inputs(batch, cond, rows, slots, spec=spec, seed=seed, key=key)
    k, mb = len(slots), len(rows)
    a = adv[rows].repeat_interleave(k).to(x0.device)
    if spec.kind == "nft":
        if lagged is None:
            raise ValueError("the nft objective needs the lagged policy's weights")
        v_old = old_velocity(policy, lagged, x_t, t, c)
        v = policy.velocity(x_t, t, c).float()
        loss = nft_loss(v, v_old, x_t, x0, t, nft_optimality(a, clip=spec.adv_clip), beta=spec.beta)
    else:
        v_lagged = old_velocity(policy, lagged, x_t, t, c) if spec.lagged_beta > 0 else None
        v = policy.velocity(x_t, t, c).float()
        loss = awm_loss(flow_matching_error(v, x0, eps), t, a, weighting=spec.weighting, clip=spec.adv_clip)
        if v_lagged is not None:
            loss = loss + spec.lagged_beta * velocity_kl(v, v_lagged)
    one = torch.ones(())
    err = flow_matching_error(v.detach(), x0, eps)
    m = {"ratio_mean": one, "ratio_min": one, "ratio_max": one, "clip_frac": torch.zeros(()),
         "approx_kl": torch.zeros(()), "loss_per_step": err.view(mb, k).mean(dim=0).cpu(), "forward_rows": mb * k}
    if kl_beta > 0:
        kl = velocity_kl(v, policy.reference_velocity(x_t, t, c))
        loss = loss + kl_beta * kl
        m["kl"] = kl.detach()
    else:
        m["kl"] = torch.zeros(())
    return loss, m
