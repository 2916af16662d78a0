"""The one module that turns plain roles into Ray actors, and builds each role from its config section."""

from __future__ import annotations

from pathlib import Path

import ray

from rollout_workers.policies import load_policy
from rollout_workers.worker import RolloutWorker
from services.config import Config, ModelConfig
from services.scheduler import WindowScheduler, WindowSpec
from services.telemetry import (
    Telemetry,
    TimedRewards,
    learner_updates,
    reward_counter_updates,
    rollout_updates,
    run_tag,
    scheduler_updates,
)

from .learner import Learner

TINY_CHECKPOINT = Path(__file__).resolve().parents[1] / "rollout_workers" / "assets" / "tiny_policy"


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


def window_spec(cfg: Config) -> WindowSpec:
    w = cfg.window
    return WindowSpec(num_steps=cfg.sampler.num_steps, size=w.size, shift_interval=w.shift_interval,
                      stride=w.stride, strategy=w.strategy, start=w.start, shift_interval_min=w.shift_interval_min,
                      decay_rate=w.decay_rate, decay_threshold=w.decay_threshold, seed=cfg.run.seed)


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


def build_worker(cfg: Config, rewards, worker_id: int = 0) -> RolloutWorker:
    s = cfg.sampler
    return RolloutWorker(
        policy_from_config(cfg.model), rewards, [r.name for r in cfg.reward.rewards], num_steps=s.num_steps,
        shift=s.shift, eta=s.eta, sde_kind=s.sde_kind, post_window=s.post_window, compress_ratio=s.compress_ratio,
        group_size=cfg.grpo.group_size, seed=cfg.run.seed, log_images=cfg.rollout.log_images,
        num_threads=cfg.rollout.num_threads, worker_id=worker_id,
    )


class WorkerOutOfSync(RuntimeError):
    """A rollout was sent to a worker that does not hold the rollout's weights (it was restarted)."""


# Named and restartable: a restarted scheduler reads its state back from the store in __init__.
@ray.remote
class SchedulerActor:
    """The WindowScheduler, publishing its window to the dashboard (`namespace` is the run id)."""

    def __init__(self, spec: WindowSpec, store_url: str = "memory", namespace: str = "default") -> None:
        self.inner = WindowScheduler(spec, store_url, namespace)
        self.telemetry = Telemetry(namespace)

    def advance(self, iteration: int):
        window = self.inner.advance(iteration)
        self.telemetry.record(scheduler_updates(iteration, tuple(window)))
        return window

    def current(self):
        return self.inner.current()

    def window(self, iteration: int):
        return self.inner.window(iteration)


@ray.remote
class LearnerActor:
    def __init__(self, cfg_json: str) -> None:
        cfg = Config.model_validate_json(cfg_json)
        self.inner = build_learner(cfg)
        self.telemetry = Telemetry(run_tag(cfg.run.output_dir, cfg.run.name))

    def call(self, method: str, *args, **kwargs):
        return getattr(self.inner, method)(*args, **kwargs)

    def channel_address(self) -> str:
        """tcp://<this node's IP>:<free port> for the collective weight-sync group (learner = rank 0)."""
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def update(self, *batches, num_groups: int | None = None):
        """Merge the shards (each group id exactly once, all of 0…num_groups-1) and update on them."""
        from services.types import merge_batches

        batch = merge_batches(list(batches), num_groups=num_groups)
        stats = self.inner.update(batch)
        self.telemetry.record(learner_updates(stats, batch.num_rows))
        return {**stats, "num_groups": len(batch.prompt_ids)}


@ray.remote
class WorkerActor:
    def __init__(self, cfg_json: str, worker_id: int) -> None:
        from reward_servers.client import RewardClient

        cfg = Config.model_validate_json(cfg_json)
        self.telemetry, self.worker = Telemetry(run_tag(cfg.run.output_dir, cfg.run.name)), str(worker_id)
        self.client, self.reward_counts = RewardClient.from_config(cfg.reward.server), {}
        self.inner = build_worker(cfg, TimedRewards(self.client, self.telemetry, self.worker), worker_id)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.inner, method)(*args, **kwargs)

    @ray.method(num_returns=2)
    def rollout(self, iteration, window, prompts, group_ids, weight_version: int):
        """-> (RolloutBatch, its group ids): the driver checks the small second object, the learner pulls the first.

        Refuses to sample unless it holds `weight_version` (the weights every shard of this rollout uses):
        a worker restarted by Ray comes back at version 0.
        """
        if self.inner.version != weight_version:
            raise WorkerOutOfSync(f"rollout worker {self.worker} holds weights version {self.inner.version}, "
                                  f"the rollout of iteration {iteration} needs {weight_version} (restarted?)")
        try:
            batch = self.inner.rollout(iteration, window, prompts, group_ids)
        finally:  # reward requests, retries and failures, also when a reward failed the rollout
            counts = self.client.metrics()
            self.telemetry.record(reward_counter_updates(self.reward_counts, counts, self.worker))
            self.reward_counts = counts
        self.telemetry.record(rollout_updates(batch.timings, batch.num_rows, batch.weight_version, self.worker))
        return batch, list(batch.prompt_ids)

    def sync_weights(self, packet):
        return self.inner.sync_weights(packet)

    def load_weights(self, packet):
        return self.inner.load_weights(packet)

    def weight_version(self) -> int:
        return self.inner.version
