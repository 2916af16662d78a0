"""The driver loop: the only place that calls `.remote()` and `ray.get`.

One iteration: window from the scheduler → prompts → rollout shards on the workers (rewards scored as
each chunk of groups finishes) → learner update on the merged shards → versioned weight broadcast →
metrics, periodic held-out evaluation and checkpoints. With `run.async_rollout` the rollout of
iteration m+1 runs while the learner updates on m (staleness 1, corrected by the recorded log π_old).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ray

from services.config import Config
from services.prompts import PromptSource, heldout_prompts

from .actors import LearnerActor, SchedulerActor, WorkerActor, window_spec
from .checkpoint import latest_checkpoint
from .progress import MetricsLog, Progress


@dataclass
class Cluster:
    scheduler: ray.actor.ActorHandle
    learner: ray.actor.ActorHandle
    workers: list


def start_actors(cfg: Config, run_id: str) -> Cluster:
    cfg_json = cfg.model_dump_json()
    scheduler = SchedulerActor.options(name=f"{run_id}-window-scheduler", num_cpus=0, max_restarts=-1,
                                       get_if_exists=True).remote(window_spec(cfg), cfg.cluster.state_store, run_id)
    learner = LearnerActor.options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus).remote(cfg_json)
    workers = [WorkerActor.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus).remote(cfg_json, i)
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


def launch_rollout(cl: Cluster, cfg: Config, prompts: PromptSource, iteration: int):
    window = tuple(ray.get(cl.scheduler.advance.remote(iteration)))
    ps = prompts.for_iteration(iteration, cfg.num_groups)
    parts = shard(list(enumerate(ps)), len(cl.workers))
    refs = [w.rollout.remote(iteration, window, [p for _, p in part], [i for i, _ in part])
            for w, part in zip(cl.workers, parts)]
    return window, refs, time.perf_counter()


def open_collective(cl: Cluster, cfg: Config) -> None:
    """Form the torch.distributed group: learner rank 0, workers 1…N (all join at once)."""
    init = ray.get(cl.learner.channel_address.remote())
    world, backend = len(cl.workers) + 1, cfg.cluster.collective_backend
    ray.get([cl.learner.call.remote("open_channel", init, world, backend),
             *[w.call.remote("open_channel", i + 1, init, world, backend) for i, w in enumerate(cl.workers)]])


def broadcast(cl: Cluster, collective: bool = False) -> tuple[int, float]:
    """Send the learner's weights to every worker and check they all hold its version; (version, seconds).

    Object store: one packet, pulled by every worker. Collective: a torch.distributed broadcast.
    """
    t0 = time.perf_counter()
    if collective:
        sent = cl.learner.call.remote("send_weights")
        versions = ray.get([w.call.remote("receive_weights") for w in cl.workers])
        ray.get(sent)
    else:
        packet = cl.learner.call.remote("get_weights")
        versions = ray.get([w.sync_weights.remote(packet) for w in cl.workers])
    expected = ray.get(cl.learner.call.remote("weight_version"))
    if any(v != expected for v in versions):
        raise RuntimeError(f"weight broadcast: workers hold versions {versions}, learner is at {expected}")
    return expected, time.perf_counter() - t0


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
    broadcast(cl, collective)  # workers start from exactly the learner's weights (verified by checksum)
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
        t_iter = max(pending[2], t_prev_end)
        window, refs, _ = pending
        if cfg.run.async_rollout and m + 1 < cfg.run.iterations:
            ray.wait(refs, num_returns=len(refs))  # this iteration's rollout is done…
            pending = launch_rollout(cl, cfg, prompts, m + 1)  # …start the next one before updating
        t_update = time.perf_counter()
        stats = ray.get(cl.learner.update.remote(*refs))
        version, t_sync = broadcast(cl, collective)
        now = time.perf_counter()
        rec = {"kind": "train", "iteration": m, "window_start": window[0], "window_size": window[1], **stats,
               "broadcast_s": t_sync, "wait_update_s": now - t_update - t_sync, "iteration_seconds": now - t_iter}
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
