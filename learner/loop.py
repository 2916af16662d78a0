"""The driver loop: the only place that calls `.remote()` and `ray.get`.

One iteration: window from the scheduler → prompts → rollout shards on the workers (rewards scored as
each chunk of groups finishes) → learner update on the merged shards → versioned weight broadcast →
metrics, periodic held-out evaluation and checkpoints. With `run.async_rollout` the rollout of
iteration m+1 runs while the learner updates on m (staleness 1, corrected by the recorded log π_old).

Faults: Ray restarts a rollout worker that died (`rollout.max_restarts`); the groups it held are re-run
on the next worker with the weights their rollout started with, so they come out identical (noise is
seeded by run seed, iteration and group id); the learner checks every group arrives exactly once; a
worker that missed a weight broadcast gets it once it is back. Train records count `rollout_retries`
and `weight_sync_retries`. Anything else (the learner, a reward that failed after the client's
retries) fails the run, which `--resume` continues from its last checkpoint.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from services.config import Config
from services.prompts import PromptSource, heldout_prompts
from services.types import merge_batches

from .actors import (
    LearnerActor,
    SchedulerActor,
    WorkerActor,
    WorkerOutOfSync,
    build_learner,
    build_worker,
    window_spec,
)
from .checkpoint import latest_checkpoint
from .progress import MetricsLog, Progress

if TYPE_CHECKING:
    from rollout_workers.worker import RewardSink

    from .learner import Learner


@dataclass
class Cluster:
    scheduler: ray.actor.ActorHandle
    learner: ray.actor.ActorHandle
    workers: list
    version: int = 0
    """The weight version the workers were last synced to: every shard of the next rollout samples with it."""
    packet: ray.ObjectRef | None = None
    """Those weights as a WeightPacket in the object store, for re-runs (None with collective weight sync)."""


def start_actors(cfg: Config, run_id: str) -> Cluster:
    cfg_json = cfg.model_dump_json()
    scheduler = SchedulerActor.options(name=f"{run_id}-window-scheduler", num_cpus=0, max_restarts=-1,
                                       get_if_exists=True).remote(window_spec(cfg), cfg.cluster.state_store, run_id)
    learner = LearnerActor.options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus).remote(cfg_json)
    # Restartable (a lost shard is re-run, see gather_rollout) and named `<run>-rollout-<i>-<tag>` so operators
    # and chaos tests can find them; the tag keeps names unique when a run is resumed in the same namespace.
    restarts = cfg.rollout.max_restarts if cfg.cluster.weight_sync == "object_store" else 0
    tag = uuid.uuid4().hex[:6]
    workers = [WorkerActor.options(name=f"{run_id}-rollout-{i}-{tag}", num_cpus=cfg.rollout.num_cpus,
                                   num_gpus=cfg.rollout.num_gpus, max_restarts=restarts).remote(cfg_json, i)
               for i in range(cfg.rollout.num_workers)]
    return Cluster(scheduler, learner, workers)


def shard(items: list, n: int) -> list[list]:
    """Split into n contiguous nearly-equal parts (empty parts dropped)."""
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
    spec, n = window_spec(cfg), cfg.run.iterations
    prompts = PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file, shapes_grammar=True)

    def rollout(m):
        parts = shard(list(enumerate(prompts.for_iteration(m, cfg.num_groups))), cfg.rollout.num_workers)
        window = tuple(spec.window(m))
        return merge_batches([worker.rollout(m, window, [p for _, p in part], [i for i, _ in part]) for part in parts],
                             num_groups=cfg.num_groups)

    worker.sync_weights(learner.get_weights())
    if observe is not None:
        observe(-1, learner)
    pending, stats = rollout(0), []
    for m in range(n):
        batch = pending
        if cfg.run.async_rollout and m + 1 < n:
            pending = rollout(m + 1)  # sampled with the weights before this update: staleness 1
        stats.append(learner.update(batch))
        worker.sync_weights(learner.get_weights())
        if observe is not None:
            observe(m, learner)
        if not cfg.run.async_rollout and m + 1 < n:
            pending = rollout(m + 1)
    return stats, [tuple(spec.window(m)) for m in range(n)], learner


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
    ray.get([cl.learner.call.remote("open_channel", init, world, backend),
             *[w.call.remote("open_channel", i + 1, init, world, backend) for i, w in enumerate(cl.workers)]])


def broadcast(cl: Cluster, collective: bool = False, restart_timeout_s: float = 300.0) -> tuple[int, float, int]:
    """Send the learner's weights to every worker and check they all hold its version.

    Object store: one packet, pulled by every worker; a worker lost meanwhile is waited for (Ray restarts
    it) and sent the packet again. Collective: a torch.distributed broadcast.
    -> (version, seconds, re-sends)
    """
    t0, resent = time.perf_counter(), 0
    if collective:
        sent = cl.learner.call.remote("send_weights")
        versions = ray.get([w.call.remote("receive_weights") for w in cl.workers])
        ray.get(sent)
    else:
        packet = cl.learner.call.remote("get_weights")
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
    expected = ray.get(cl.learner.call.remote("weight_version"))
    if any(v != expected for v in versions):
        raise RuntimeError(f"weight broadcast: workers hold versions {versions}, learner is at {expected}")
    cl.version = expected
    return expected, time.perf_counter() - t0, resent


def evaluate(cl: Cluster, cfg: Config, iteration: int, log: MetricsLog) -> dict:
    """Held-out verifier scores and a 16-cell sample grid (fixed prompts and noise: the cells compare over time).

    The grid is saved as <run>/samples/<iter>.png + .json; `rec["samples"]` (its path relative to the run)
    is how observers, the record and the report find it.
    """
    from .samples import save_grid

    res = ray.get(cl.learner.call.remote("evaluate", heldout_prompts(cfg.run.eval_prompts), grid=16,
                                         num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift,
                                         seed=cfg.run.eval_seed))
    rec = {"kind": "eval", "iteration": iteration, "eval_verifier_score": res["score"],
           "eval_verifier_strict": res["strict"],
           **{f"eval_{c}_score": v["score"] for c, v in res.get("per_category", {}).items()}}
    if res.get("grid_images") is not None:
        rec["samples"] = save_grid(log.path.parent, iteration, res["grid_images"], res["grid_prompts"],
                                   res.get("grid_scores"))
    log.write(rec)
    return rec


def stop_actors(cl: Cluster) -> None:
    for actor in (cl.learner, *cl.workers):
        ray.kill(actor)
    ray.kill(cl.scheduler, no_restart=True)


class Observer:
    """Hooks the loop calls with every record (metrics, TensorBoard, grids, reports plug in here)."""

    def on_iteration(self, rec: dict) -> None: ...

    def on_eval(self, rec: dict, images=None, prompts=None) -> None: ...

    def close(self) -> None: ...


def run_loop(cfg: Config, out: Path, run_id: str, resume: bool = False, observers: list[Observer] = ()) -> dict:
    cl = start_actors(cfg, run_id)
    try:
        return _iterate(cl, cfg, out, run_id, resume, list(observers))
    finally:
        for obs in observers:
            obs.close()
        stop_actors(cl)


def _iterate(cl: Cluster, cfg: Config, out: Path, run_id: str, resume: bool, observers: list[Observer]) -> dict:
    log, progress = MetricsLog(out / "metrics.jsonl"), Progress(cfg.run.iterations)
    start = 0
    if resume:
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        meta = ray.get(cl.learner.call.remote("restore", str(ckpt)))
        start = int(meta["iteration"]) + 1
        log.truncate_after(start - 1)
        print(f"resumed from {ckpt} (iteration {meta['iteration']}, weight version {meta['version']})", flush=True)
    collective = cfg.cluster.weight_sync == "collective"
    if collective:
        open_collective(cl, cfg)
    broadcast(cl, collective, cfg.rollout.restart_timeout_s)  # workers start from the learner's weights (verified)
    if not resume:
        first = evaluate(cl, cfg, -1, log)
        progress.report_eval(first)
        for obs in observers:
            obs.on_eval(first)
    prompts = PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file,
                           shapes_grammar=cfg.model.backend == "tiny")
    pending = launch_rollout(cl, cfg, prompts, start) if start < cfg.run.iterations else None
    last_eval, t_prev_end = None, time.perf_counter()
    for m in range(start, cfg.run.iterations):
        # from this rollout's launch (sync) or the previous iteration's end (async: the rollout overlapped it);
        # evaluation and checkpoint time are not part of an iteration
        t_iter, ro, t_wait = max(pending.started, t_prev_end), pending, time.perf_counter()
        refs = gather_rollout(cl, cfg, ro)  # this iteration's rollout is done (lost shards re-run)…
        if cfg.run.async_rollout and m + 1 < cfg.run.iterations:
            pending = launch_rollout(cl, cfg, prompts, m + 1)  # …start the next one before updating
        t_update = time.perf_counter() if cfg.run.async_rollout else t_wait
        stats = ray.get(cl.learner.update.remote(*refs, num_groups=cfg.num_groups))
        _, t_sync, resent = broadcast(cl, collective, cfg.rollout.restart_timeout_s)
        now = time.perf_counter()
        rec = {"kind": "train", "iteration": m, "window_start": ro.window[0], "window_size": ro.window[1], **stats,
               "rollout_retries": ro.retries, "weight_sync_retries": resent, "broadcast_s": t_sync,
               "wait_update_s": now - t_update - t_sync, "iteration_seconds": now - t_iter}
        log.write(rec)
        progress.report(rec)
        for obs in observers:
            obs.on_iteration(rec)
        done = m + 1 == cfg.run.iterations
        if cfg.run.eval_every and (m + 1) % cfg.run.eval_every == 0 or done:
            last_eval = evaluate(cl, cfg, m, log)
            progress.report_eval(last_eval)
            for obs in observers:
                obs.on_eval(last_eval)
        if cfg.learner.checkpoint_every and (m + 1) % cfg.learner.checkpoint_every == 0 or done:
            ray.get(cl.learner.call.remote("save", str(out / "checkpoints"), {"run_id": run_id}))
        t_prev_end = time.perf_counter()
        if not cfg.run.async_rollout and not done:
            pending = launch_rollout(cl, cfg, prompts, m + 1)
    return {"final_eval": last_eval, "output_dir": str(out)}
