"""The run without Ray: one learner and one worker in this process, shard for shard the work `run_loop` does.

Its statistics and weights are the reference a distributed run must reproduce (tests/integration/test_faults.py),
and what the in-process tools and benchmarks train with (benchmarks/reward_control.py).
"""

from __future__ import annotations

from collections.abc import Callable

from learner.training import Learner
from rollout_workers.worker import RewardSink
from services.config import Config
from services.prompts import PromptSource
from services.types import merge_batches

from .build import build_learner, build_scheduler, build_worker, rollout_overlaps_update


def shard(items: list, n: int) -> list[list]:
    """Split into n contiguous nearly-equal parts (empty parts dropped): a rollout's groups across n workers."""
    k, r = divmod(len(items), n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + k + (1 if i < r else 0)
        if hi > lo:
            out.append(items[lo:hi])
        lo = hi
    return out


def run_inprocess(cfg: Config, rewards: RewardSink, observe: Callable[[int, Learner], None] | None = None
                  ) -> tuple[list[dict], list[tuple[int, int]], Learner]:
    """The run without Ray: one learner and one worker in this process, with the same shards, windows, seeds,
    weight syncs and (a)sync schedule as `run_loop`, so its statistics and weights are the reference a
    distributed run must reproduce. `rewards` is a reward sink (e.g. `reward_servers.client.LocalRewards`);
    `observe(iteration, learner)` runs before training with iteration −1 (as the loop's first eval record) and
    after each update and weight sync.

    -> (train statistics per iteration, (start, size) window per iteration, the learner)
    """
    learner, worker = build_learner(cfg), build_worker(cfg, rewards)
    schedule, n = build_scheduler(cfg), cfg.run.iterations
    prompts = PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file,
                           shapes_grammar=cfg.model.backend == "tiny")

    def rollout(m):
        parts = shard(list(enumerate(prompts.for_iteration(m, cfg.num_groups))), cfg.rollout.num_workers)
        window = tuple(schedule.window(m))
        return merge_batches([worker.rollout(m, window, [p for _, p in part], [i for i, _ in part]) for part in parts],
                             num_groups=cfg.num_groups)

    worker.sync_weights(learner.get_weights())
    if observe is not None:
        observe(-1, learner)
    pending, stats = rollout(0), []
    for m in range(n):
        batch = pending
        overlapped = rollout_overlaps_update(cfg, m)
        if overlapped:
            pending = rollout(m + 1)  # sampled with the weights before this update: staleness 1
        stats.append(learner.update(batch))
        worker.sync_weights(learner.get_weights())
        if observe is not None:
            observe(m, learner)
        if not overlapped and m + 1 < n:
            pending = rollout(m + 1)
    return stats, [tuple(schedule.window(m)) for m in range(n)], learner
