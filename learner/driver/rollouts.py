"""Rollouts across the workers and the weight broadcast, with the driver's fault handling (Ray calls).

A rollout is split into shards of whole groups, one per worker (`learner.driver.inprocess.shard`, the
split the in-process reference uses too). Faults: Ray restarts a rollout worker that died
(`rollout.max_restarts`); the groups it held are re-run on the next worker with the weights their rollout
started with, so they come out identical (noise is seeded by run seed, iteration and group id); every
group must arrive exactly once; a worker that missed a weight broadcast gets it once it is back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from services.config import Config
from services.prompts import PromptSource

from .actors import WorkerOutOfSync
from .inprocess import shard


@dataclass
class Cluster:
    scheduler: ray.actor.ActorHandle
    learners: list
    """The learner ranks (one, or K in a placement group); rank 0 publishes weights and writes checkpoints."""
    workers: list
    version: int = 0
    """The weight version the workers were last synced to: every shard of the next rollout samples with it."""
    packet: ray.ObjectRef | None = None
    """Those weights as a WeightPacket in the object store, for re-runs (None with collective weight sync)."""
    sharded: bool = False
    """FSDP: gathering the weights (to publish or save them) takes every rank."""
    placement_group: object | None = None

    @property
    def learner(self) -> ray.actor.ActorHandle:
        return self.learners[0]

    def gathering(self) -> list:
        """The ranks a weight gather needs: all of them under FSDP, else rank 0 alone."""
        return self.learners if self.sharded else self.learners[:1]


@dataclass
class Shard:
    """Some groups of one rollout, on one worker. `batch` (RolloutBatch) and `ids` (its group ids) are refs."""

    worker: int
    group_ids: list[int]
    prompts: list[str]
    batch: ray.ObjectRef
    ids: ray.ObjectRef


@dataclass
class Rollout:
    """One iteration's rollout in flight: its window, the weights all shards use, the shards."""

    iteration: int
    window: tuple[int, int]
    version: int
    packet: ray.ObjectRef | None  # async: one version behind the learner by the time the rollout is gathered
    started: float
    shards: list[Shard] = field(default_factory=list)
    retries: int = 0  # shards re-run after their worker was lost


def _submit(cl: Cluster, ro: Rollout, worker: int, group_ids: list[int], prompts: list[str]) -> Shard:
    batch, ids = cl.workers[worker].rollout.remote(ro.iteration, ro.window, prompts, group_ids, ro.version)
    return Shard(worker, group_ids, prompts, batch, ids)


def launch_rollout(cl: Cluster, cfg: Config, prompts: PromptSource, iteration: int) -> Rollout:
    window = tuple(ray.get(cl.scheduler.advance.remote(iteration)))
    ps = prompts.for_iteration(iteration, cfg.num_groups)
    ro = Rollout(iteration, window, cl.version, cl.packet, time.perf_counter())
    for w, part in enumerate(shard(list(enumerate(ps)), len(cl.workers))):
        ro.shards.append(_submit(cl, ro, w, [i for i, _ in part], [p for _, p in part]))
    return ro


# A shard is lost when its worker died (ActorDiedError), is restarting (ActorUnavailableError) or came back
# restarted, at weight version 0 (WorkerOutOfSync). Any other error (a reward that failed after the
# client's retries, a bug) fails the run: re-running would not help.
LOST = (ray.exceptions.RayActorError, WorkerOutOfSync)


def gather_rollout(cl: Cluster, cfg: Config, ro: Rollout) -> list[ray.ObjectRef]:
    """Wait for every shard; re-run lost ones. -> one batch ref per shard, holding each group exactly once.

    Shard s lost on worker w is re-run on worker w+1 (then w+2, …, at most `rollout.max_retries` times),
    after loading the weights the rollout started with; its groups' noise is seeded by (run seed,
    iteration, group id), so the re-run repeats them exactly. Only the small `ids` objects come to the
    driver; the batches go from the workers to the learner.
    """
    refs, seen = [], []
    for sh in ro.shards:
        sh, ids = _collect(cl, cfg, ro, sh)
        if list(ids) != sh.group_ids:
            raise RuntimeError(f"worker {sh.worker} returned groups {ids} for groups {sh.group_ids}")
        refs.append(sh.batch)
        seen += ids
    if sorted(seen) != list(range(cfg.num_groups)):
        raise RuntimeError(f"rollout of iteration {ro.iteration} holds groups {sorted(seen)}, "
                           f"expected 0…{cfg.num_groups - 1} once each")
    return refs


def _collect(cl: Cluster, cfg: Config, ro: Rollout, sh: Shard) -> tuple[Shard, list[int]]:
    error: Exception | None = None
    for attempt in range(cfg.rollout.max_retries + 1):
        try:
            if error is not None:
                sh = _rerun(cl, cfg, ro, sh, attempt, error)
            return sh, ray.get(sh.ids)
        except LOST as e:
            error = e
    raise RuntimeError(f"groups {sh.group_ids} of iteration {ro.iteration} were lost {cfg.rollout.max_retries + 1} "
                       f"times (rollout.max_retries={cfg.rollout.max_retries}); last: {error}") from error


def _rerun(cl: Cluster, cfg: Config, ro: Rollout, lost: Shard, attempt: int, error: Exception) -> Shard:
    if ro.packet is None:
        raise RuntimeError(f"rollout worker {lost.worker} was lost ({type(error).__name__}) and collective weight "
                           "sync cannot re-admit a restarted worker: use cluster.weight_sync=object_store, or "
                           "--resume the run") from error
    target = (lost.worker + 1) % len(cl.workers)
    print(f"rollout: worker {lost.worker} lost groups {lost.group_ids} of iteration {ro.iteration} "
          f"({type(error).__name__}); re-running them on worker {target} "
          f"(retry {attempt}/{cfg.rollout.max_retries})", flush=True)
    ro.retries += 1
    worker = cl.workers[target]
    wait_reachable(worker, cfg.rollout.restart_timeout_s)
    ray.get(worker.load_weights.remote(ro.packet))  # checksum-verified; raises WeightSyncError on a mismatch
    rerun = _submit(cl, ro, target, lost.group_ids, lost.prompts)
    if cl.packet is not None and cl.version != ro.version:  # async: back to the newest weights afterwards
        worker.sync_weights.remote(cl.packet)  # (runs after the re-run; if it fails, the version check catches it)
    return rerun


def wait_reachable(worker: ray.actor.ActorHandle, timeout_s: float) -> None:
    """Block until `worker` answers, e.g. after Ray restarted it (its calls fail fast while it restarts).

    ActorDiedError (gone for good) propagates; after `timeout_s` a RuntimeError says so.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(worker.weight_version.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"a rollout worker did not come back within {timeout_s:.0f} s "
                                   "(rollout.restart_timeout_s)") from e
            time.sleep(0.5)


def open_collective(cl: Cluster, cfg: Config) -> None:
    """Form the torch.distributed group: learner rank 0, workers 1…N (all join at once)."""
    init = ray.get(cl.learner.channel_address.remote())
    world, backend = len(cl.workers) + 1, cfg.cluster.collective_backend
    ray.get([cl.learner.open_channel.remote(init, world, backend),
             *[w.open_channel.remote(i + 1, init, world, backend) for i, w in enumerate(cl.workers)]])


def broadcast(cl: Cluster, collective: bool = False, restart_timeout_s: float = 300.0) -> tuple[int, float, int]:
    """Send the learner's weights to every worker and check they all hold its version.

    Object store: one packet, pulled by every worker; a worker lost meanwhile is waited for (Ray restarts
    it) and sent the packet again. Collective: a torch.distributed broadcast.
    -> (version, seconds, re-sends)
    """
    t0, resent = time.perf_counter(), 0
    if collective:
        sent = [rank.send_weights.remote() for rank in cl.gathering()]
        versions = ray.get([w.receive_weights.remote() for w in cl.workers])
        ray.get(sent)
    else:
        packet = [rank.get_weights.remote() for rank in cl.gathering()][0]  # rank 0's; the others helped gather
        ray.get(cl.learner.weight_version.remote())  # the learner is alive (a dead one raises here, not per worker)
        refs = [w.sync_weights.remote(packet) for w in cl.workers]
        versions = []
        for i, (w, ref) in enumerate(zip(cl.workers, refs)):
            for attempt in range(3):
                try:
                    versions.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as e:
                    if attempt == 2:
                        raise
                    print(f"weight sync: worker {i} is gone ({type(e).__name__}); sending again once it is back",
                          flush=True)
                    resent += 1
                    wait_reachable(w, restart_timeout_s)
                    ref = w.sync_weights.remote(packet)
        cl.packet = packet
    expected = ray.get(cl.learner.weight_version.remote())
    if any(v != expected for v in versions):
        raise RuntimeError(f"weight broadcast: workers hold versions {versions}, learner is at {expected}")
    cl.version = expected
    return expected, time.perf_counter() - t0, resent
