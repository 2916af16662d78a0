"""Each role built from its config sections, as a plain object (no Ray): the actors, the in-process run and
the command-line tools all build through here.

    policy = policy_from_config(cfg.model)            # the shipped tiny checkpoint unless model.path is set
    learner, worker = build_learner(cfg), build_worker(cfg, rewards)
    scheduler = build_scheduler(cfg)                  # the window schedule; state in cluster.state_store
"""

from __future__ import annotations

from pathlib import Path

from learner.training import Learner
from rollout_workers.policies import load_policy
from rollout_workers.worker import RewardSink, RolloutWorker
from services.config import Config, ModelConfig
from services.scheduler import WindowScheduler

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "rollout_workers" / "assets" / "tiny_policy"


def policy_from_config(model: ModelConfig):
    """Load the configured backend from its local folder (the shipped tiny checkpoint by default)."""
    path = model.path or str(TINY_CHECKPOINT)
    options: dict = {"lora_rank": model.lora_rank, "autocast_bf16": model.autocast_bf16,
                     "gradient_checkpointing": model.gradient_checkpointing}
    if model.lora_alpha:
        options["lora_alpha"] = model.lora_alpha
    if model.backend != "tiny":
        options.update(height=model.height, width=model.width, guidance_scale=model.guidance_scale)
    return load_policy(model.backend, path, **options)


def build_learner(cfg: Config) -> Learner:
    lc, g = cfg.learner, cfg.grpo
    return Learner(
        policy_from_config(cfg.model), lr=lc.lr, weight_decay=lc.weight_decay, betas=lc.betas,
        grad_clip=lc.grad_clip, micro_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=lc.gradient_accumulation_steps, clip_range=g.clip_range,
        adv_clip_max=g.adv_clip_max, reward_weights={r.name: r.weight for r in cfg.reward.rewards},
        reward_aggregation=g.reward_aggregation, train_fraction=g.train_fraction, num_inner_epochs=g.num_inner_epochs,
        eta=cfg.sampler.eta, sde_kind=cfg.sampler.sde_kind, seed=cfg.run.seed, num_threads=lc.num_threads,
    )


def build_worker(cfg: Config, rewards: RewardSink, worker_id: int = 0) -> RolloutWorker:
    s = cfg.sampler
    return RolloutWorker(
        policy_from_config(cfg.model), rewards, [r.name for r in cfg.reward.rewards], num_steps=s.num_steps,
        shift=s.shift, eta=s.eta, sde_kind=s.sde_kind, post_window=s.post_window, compress_ratio=s.compress_ratio,
        group_size=cfg.grpo.group_size, seed=cfg.run.seed, log_images=cfg.rollout.log_images,
        num_threads=cfg.rollout.num_threads, worker_id=worker_id,
    )


def build_scheduler(cfg: Config, store_url: str = "memory", namespace: str = "default") -> WindowScheduler:
    return WindowScheduler(cfg.window, num_steps=cfg.sampler.num_steps, seed=cfg.run.seed, store_url=store_url,
                           namespace=namespace)
