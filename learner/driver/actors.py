"""The one module that applies `ray.remote`: each plain role wrapped as an actor with explicit methods.

    SchedulerActor   the WindowScheduler, publishing its window to the dashboard
    LearnerActor     the Learner (the transformer only: no VAE, no text encoders)
    WorkerActor      a RolloutWorker, scoring through the reward service; worker 0 also runs the held-out
                     evaluation, after a broadcast, with the newest (verified) weights

Every method the driver calls is written out here (no dispatch by name), so a renamed method fails where
it is called. The actors add only what a process boundary needs: the config arrives as JSON, metrics go to
the dashboard (services/telemetry.py), and a worker refuses to sample with weights other than those asked.
"""

from __future__ import annotations

import ray

from learner import evaluation
from learner.training import Learner
from learner.training.threads import ThreadBoost
from rollout_workers.worker import RolloutWorker
from services.config import Config, WindowConfig
from services.scheduler import WindowScheduler
from services.telemetry import (
    Telemetry,
    learner_updates,
    reward_counter_updates,
    rollout_updates,
    run_tag,
    scheduler_updates,
)
from services.types import RolloutBatch, merge_batches

from .build import build_learner, build_worker


class WorkerOutOfSync(RuntimeError):
    """A rollout was sent to a worker that does not hold the rollout's weights (it was restarted)."""


def _all_done(refs: list[ray.ObjectRef]) -> bool:
    """Whether every task behind `refs` has finished (without fetching their values)."""
    return len(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) == len(refs)


# Named and restartable: a restarted scheduler reads its state back from the store in __init__.
@ray.remote
class SchedulerActor:
    """The WindowScheduler (`namespace` is the run id: its key in the state store and its metrics tag)."""

    def __init__(self, window: WindowConfig, num_steps: int, seed: int, store_url: str = "memory",
                 namespace: str = "default") -> None:
        self.inner = WindowScheduler(window, num_steps=num_steps, seed=seed, store_url=store_url, namespace=namespace)
        self.telemetry = Telemetry(namespace)

    def advance(self, iteration: int):
        window = self.inner.advance(iteration)
        self.telemetry.record(scheduler_updates(iteration, tuple(window)))
        return window

    def restore(self, iteration: int):
        return self.inner.restore(iteration)

    def current(self):
        return self.inner.current()

    def window(self, iteration: int):
        return self.inner.window(iteration)


@ray.remote
class LearnerActor:
    """One rank of the learner (rank 0 of K publishes weights and writes checkpoints)."""

    def __init__(self, cfg_json: str, rank: int = 0) -> None:
        self.cfg, self.rank = Config.model_validate_json(cfg_json), rank
        self.inner: Learner = build_learner(self.cfg)
        self.telemetry = Telemetry(run_tag(self.cfg.run.output_dir, self.cfg.run.name))

    def join_group(self, init_method: str, world_size: int) -> None:
        """Join the learner ranks' torch.distributed group: NCCL when the model is on a GPU, else gloo."""
        backend = "nccl" if self.inner.device.type == "cuda" else "gloo"
        self.inner.join_group(init_method, self.rank, world_size, backend, self.cfg.learner.sharding)

    def update(self, *batches: RolloutBatch, num_groups: int | None = None,
               overlap: tuple[list[ray.ObjectRef], int] | None = None) -> dict:
        """Merge the shards (each group id exactly once, all of 0…num_groups-1) and update on them.

        `overlap` (async mode): (the next rollout's shard refs, extra threads): once every shard is done, the rest of
        the update runs with that many more torch threads (learner/training/threads.py)."""
        batch = merge_batches(list(batches), num_groups=num_groups)
        refs, extra = overlap if overlap else ([], 0)
        boost = ThreadBoost(lambda: _all_done(refs), extra if refs else 0)
        try:
            stats = {**self.inner.update(batch, between=boost), **boost.stats()}
        finally:
            boost.restore()
        out = {**stats, "num_groups": len(batch.prompt_ids)}
        if self.rank == 0:
            self.telemetry.record(learner_updates(stats, batch.num_rows))
            out["samples"] = batch.logged_samples(self.cfg.rollout.log_images)  # for the observers, not the record
        return out

    def get_weights(self):
        """The weight packet (rank 0; the other ranks of an FSDP learner take part in gathering it: None)."""
        packet = self.inner.get_weights()
        return packet if self.rank == 0 else None

    def evaluated_weights(self):
        """`Learner.evaluated_weights` (rank 0; the other ranks of an FSDP learner take part in gathering: None)."""
        packet = self.inner.evaluated_weights()
        return packet if self.rank == 0 else None

    def weight_version(self) -> int:
        return self.inner.weight_version()

    def save(self, root: str, extra: dict | None = None) -> str:
        return self.inner.save(root, extra)

    def restore(self, path: str) -> dict:
        return self.inner.restore(path)

    def channel_address(self) -> str:
        """tcp://<this node's IP>:<free port> for the collective weight-sync group (learner = rank 0)."""
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def open_channel(self, init_method: str, world_size: int, backend: str) -> None:
        self.inner.open_channel(init_method, world_size, backend)

    def send_weights(self) -> tuple[int, str] | None:
        return self.inner.send_weights()


@ray.remote
class WorkerActor:
    def __init__(self, cfg_json: str, worker_id: int) -> None:
        from reward_servers.client import RewardClient, TimedRewards

        self.cfg = cfg = Config.model_validate_json(cfg_json)
        self.telemetry, self.worker = Telemetry(run_tag(cfg.run.output_dir, cfg.run.name)), str(worker_id)
        self.client, self.reward_counts = RewardClient.from_config(cfg.reward.server), {}
        self.inner: RolloutWorker = build_worker(cfg, TimedRewards(self.client, self.telemetry, self.worker),
                                                 worker_id)

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

    def evaluate(self, shard: tuple[int, int], grid: int = 16, weights=None) -> dict:
        """Prompts [lo, hi) of the run's held-out evaluation with the weights this worker holds, or with `weights` (a
        packet, loaded for the evaluation only: DiffusionNFT's θ) (`learner.evaluation.evaluate_shard`); rewards are
        scored by the run's reward service, like the rollouts'."""
        rewards = {s.name: (lambda images, prompts, n=s.name: self.client.score(n, images, prompts))
                   for s in evaluation.reward_specs(self.cfg)}
        with self.inner.holding(weights):
            result = evaluation.evaluate_shard(self.inner.policy, evaluation.run_prompts(self.cfg), shard,
                                               **evaluation.settings(self.cfg), rewards=rewards, grid=grid)
        return {**result, "weight_version": self.inner.version if weights is None else weights.version}

    def sync_weights(self, packet) -> int:
        return self.inner.sync_weights(packet)

    def load_weights(self, packet) -> int:
        return self.inner.load_weights(packet)

    def weight_version(self) -> int:
        return self.inner.version

    def open_channel(self, rank: int, init_method: str, world_size: int, backend: str) -> None:
        self.inner.open_channel(rank, init_method, world_size, backend)

    def receive_weights(self) -> int:
        return self.inner.receive_weights()
