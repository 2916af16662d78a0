"""Each role built from its config sections, as a plain object (no Ray): the actors, the in-process run and
the command-line tools all build through here.

    policy = policy_from_config(cfg.model, role="rollout")   # the shipped tiny checkpoint unless model.path
    learner, worker = build_learner(cfg), build_worker(cfg, rewards)
    scheduler = build_scheduler(cfg)                         # the window schedule; state in cluster.state_store

Placement and precision per role (`model.device`, `model.weights_dtype`): the model goes to the GPU Ray
gave the actor (else the CPU). Rollout workers and evaluation hold every weight in the inference dtype
(bf16 on a GPU by default). The learner holds what it trains in fp32 (the LoRA adapter; the whole
transformer at lora_rank 0) over frozen weights in the inference dtype, and drops the VAE and text encoders:
it trains on the latents and conditioning the rollouts recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from learner.training import Learner
from learner.training.objectives import AWM_DECAY_CAP, MatchingSpec
from rollout_workers.policies import load_policy
from rollout_workers.worker import RewardSink, RolloutWorker
from services.config import Config, ModelConfig
from services.devices import resolve_device
from services.scheduler import WindowScheduler

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "rollout_workers" / "assets" / "tiny_policy"
Role = Literal["rollout", "learner", "eval"]


def inference_dtype(model: ModelConfig, device: torch.device) -> str:
    """`model.weights_dtype`, with auto = bfloat16 on a GPU and float32 on the CPU."""
    if model.weights_dtype != "auto":
        return model.weights_dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def rollout_weights_dtype(cfg: Config) -> torch.dtype:
    """The dtype rollout workers hold full weights in, from the config alone (the learner sends them so)."""
    gpu = cfg.model.device == "cuda" or (cfg.model.device == "auto" and cfg.rollout.num_gpus > 0)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        inference_dtype(cfg.model, torch.device("cuda" if gpu else "cpu"))]


def policy_from_config(model: ModelConfig, role: Role = "eval", device: torch.device | str | None = None):
    """Load the configured backend from its local folder (the shipped tiny checkpoint by default), for `role`, on
    `device` (default: `model.device` resolved in this process)."""
    device = resolve_device(model.device) if device is None else torch.device(device)
    path = model.path or str(TINY_CHECKPOINT)
    options: dict = {"lora_rank": model.lora_rank, "autocast_bf16": model.autocast_bf16,
                     "gradient_checkpointing": model.gradient_checkpointing,
                     "weights_dtype": inference_dtype(model, device)}
    if model.lora_alpha:
        options["lora_alpha"] = model.lora_alpha
    options["guidance_scale"] = model.guidance_scale
    if model.backend != "tiny":
        options.update(height=model.height, width=model.width)
    policy = load_policy(model.backend, path, **options)
    if role == "learner":
        policy.release_inference_parts()
        if model.lora_rank == 0:
            policy.trainable.set_dtype(torch.float32)  # fp32 master weights of the transformer it trains
    return policy.to(device)


def auto_threads(cfg: Config, cores: int) -> Config:
    """`cfg` with its `num_threads` = 0 (auto) replaced for a node of `cores` CPUs, so that every core works in
    every phase and none is oversubscribed:

    - sync mode: the phases follow each other, so each takes the whole node: rollout workers C // W threads each,
      learner ranks C // K each;
    - async mode: the rollout of m+1 runs during the update of m, so they split the node: the workers share
      C // 2 cores (at least one thread each), the learner ranks the rest.

    - async mode, once the overlapping rollout is done: the learner ranks take the rest of the node too
      (`learner.overlap_threads`, -1 → (C − K × learner threads) // K when the learner's count is auto, else 0).

    E.g. 2 cores, 2 workers, 1 rank: sync 1 / 2 threads, async 1 / 1 (+ 1 once the rollout is done); 16 cores:
    sync 8 / 16, async 4 / 8 (+ 8). Explicit counts (≥ 0 for overlap_threads) are kept."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    w, k = cfg.rollout.num_workers, cfg.learner.num_workers
    rollout_cores = max(w, cores // 2) if cfg.run.async_rollout else cores
    learner_cores = max(k, cores - rollout_cores) if cfg.run.async_rollout else cores
    update = {}
    if cfg.rollout.num_threads == 0:
        update["rollout"] = cfg.rollout.model_copy(update={"num_threads": max(1, rollout_cores // w)})
    learner = {}
    if cfg.learner.num_threads == 0:
        learner["num_threads"] = max(1, learner_cores // k)
    if cfg.learner.overlap_threads == -1:  # the cores the ranks leave to the rollout, theirs once it is done
        auto = cfg.run.async_rollout and cfg.learner.num_threads == 0
        learner["overlap_threads"] = max(0, cores - k * learner["num_threads"]) // k if auto else 0
    if learner:
        update["learner"] = cfg.learner.model_copy(update=learner)
    return cfg.model_copy(update=update)


def checkpoints_after(cfg: Config, m: int) -> bool:
    """Iteration m ends with a checkpoint (every `learner.checkpoint_every`, and the last)."""
    return bool(cfg.learner.checkpoint_every and (m + 1) % cfg.learner.checkpoint_every == 0) \
        or m + 1 == cfg.run.iterations


def rollout_overlaps_update(cfg: Config, m: int) -> bool:
    """Async mode launches iteration m+1's rollout before m's update (it samples with the weights before it:
    staleness 1), except after an iteration that ends with a checkpoint: there m+1 samples with the checkpointed
    weights (staleness 0), which is what a run resumed from that checkpoint, or a learner replaying from it, can
    do. So an async run resumes and replays exactly, for one non-overlapped iteration per checkpoint."""
    return cfg.run.async_rollout and not checkpoints_after(cfg, m)  # (the last iteration ends with one)


def build_learner(cfg: Config) -> Learner:
    lc, g = cfg.learner, cfg.grpo
    return Learner(
        policy_from_config(cfg.model, "learner"), lr=lc.lr, weight_decay=lc.weight_decay, betas=lc.betas,
        grad_clip=lc.grad_clip, micro_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=lc.gradient_accumulation_steps, clip_range=g.clip_range,
        adv_clip_max=g.adv_clip_max, reward_weights={r.name: r.weight for r in cfg.reward.rewards},
        reward_aggregation=g.reward_aggregation, train_fraction=g.train_fraction, num_inner_epochs=g.num_inner_epochs,
        eta=cfg.sampler.eta, sde_kind=cfg.sampler.sde_kind, seed=cfg.run.seed, num_threads=lc.num_threads,
        kl_beta=g.kl_beta, sync_dtype=None if cfg.model.lora_rank else rollout_weights_dtype(cfg),
        timesteps_per_backward=lc.timesteps_per_backward, objective=g.objective,
        matching=MatchingSpec(kind=g.objective, times=g.matching_times, num_steps=cfg.sampler.num_steps,
                              shift=cfg.sampler.shift, weighting=g.awm_weighting, beta=g.nft_beta,
                              decay_cap=g.nft_decay_cap if g.objective == "nft" else AWM_DECAY_CAP,
                              lagged_beta=g.awm_lagged_beta, adv_clip=g.adv_clip_max) if g.objective != "grpo" else None,
        branching=cfg.sampler.branching, train_selection=g.train_selection, advantage_std=g.advantage_std,
        matching_aux=g.matching_aux, update_order=lc.update_order,
        aux=MatchingSpec(kind="awm", times=g.matching_times, num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift,
                         weighting=g.awm_weighting, adv_clip=g.adv_clip_max) if g.matching_aux > 0 else None,
    )


def build_worker(cfg: Config, rewards: RewardSink, worker_id: int = 0) -> RolloutWorker:
    s = cfg.sampler
    return RolloutWorker(
        policy_from_config(cfg.model, "rollout"), rewards, [r.name for r in cfg.reward.rewards], num_steps=s.num_steps,
        shift=s.shift, eta=s.eta, sde_kind=s.sde_kind, post_window=s.post_window, compress_ratio=s.compress_ratio,
        group_size=cfg.grpo.group_size, seed=cfg.run.seed, log_images=cfg.rollout.log_images,
        num_threads=cfg.rollout.num_threads, worker_id=worker_id, keep_final=cfg.grpo.objective != "grpo" or cfg.grpo.matching_aux > 0,
        branching=s.branching, granularities=s.granularities, group_noise=s.group_noise,
    )


def build_scheduler(cfg: Config, store_url: str = "memory", namespace: str = "default") -> WindowScheduler:
    return WindowScheduler(cfg.window, num_steps=cfg.sampler.num_steps, seed=cfg.run.seed, store_url=store_url,
                           namespace=namespace)
