"""The driver loop: the only place that calls `.remote()` and `ray.get` (with rollouts.py, its helpers).

One iteration: window from the scheduler → prompts → rollout shards on the workers (rewards scored as
each chunk of groups finishes) → learner update on the merged shards → versioned weight broadcast →
metrics, periodic held-out evaluation and checkpoints. With `run.async_rollout` the rollout of
iteration m+1 runs while the learner updates on m (staleness 1, corrected by the recorded log π_old).

Faults: lost rollout shards are re-run and a worker that missed a broadcast is sent it again (rollouts.py); a
learner that dies is started again from its last checkpoint and the iterations since are replayed (recovery.py,
up to `learner.max_restarts` times); train records count `rollout_retries`, `weight_sync_retries`,
`learner_restarts` and `replayed_iterations`. Anything else (a reward that failed after the client's retries)
fails the run, which `--resume` continues from its last checkpoint: the learner restores it, the window scheduler
is put back at its iteration (whatever store it uses), and prompts and noise are functions of the run seed and
the iteration.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import ray

from learner.evaluation import combine, eval_record, run_prompts, shards
from learner.evaluation import settings as evaluation_settings
from learner.outputs.grids import save_grid
from learner.outputs.metrics import MetricsLog, Progress
from learner.outputs.observers import Observer, rewind
from learner.training import latest_checkpoint
from services.config import Config, dump_config
from services.prompts import PromptSource

from .actors import LearnerActor, SchedulerActor, WorkerActor
from .build import auto_threads, checkpoints_after, rollout_overlaps_update
from .recovery import all_ranks, learners_alive, recover_learner
from .rollouts import Cluster, Rollout, broadcast, gather_rollout, launch_rollout, open_collective

# glibc's malloc hands large freed blocks back to the OS and maps them again on the next use. A rollout worker's ODE
# steps free every activation, so its evaluations paid page faults that DanceGRPO's (which keeps its latents) did
# not (4.89 against 3.92 CPU-ms per evaluation at the paper's shape, 4.03 with these); the learner, idle while the
# workers sample, maps its activations again at the start of every update (MixGRPO's update 1.77 -> 1.50 s, DanceGRPO's
# 7.19 -> 6.74 s): benchmarks/results/compare_methods_paper_history.md.
ACTOR_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


def malloc_runtime_env(environ: dict[str, str] | None = None) -> dict:
    """The rollout and learner actors' runtime_env: keep freed memory in the process (ACTOR_MALLOC_ENV), unless the
    driver's environment sets these variables itself, in which case its values win."""
    environ = os.environ if environ is None else environ
    return {"env_vars": {k: environ.get(k, v) for k, v in ACTOR_MALLOC_ENV.items()}}


def start_actors(cfg: Config, run_id: str, *, resources_checked: bool = False) -> Cluster:
    if not resources_checked:  # Ray would wait for them silently; an autoscaler may still add them
        from .cluster_checks import check_resources

        check_resources(cfg, ray.cluster_resources(), local=False)
    cfg_json = cfg.model_dump_json()
    scheduler = SchedulerActor.options(name=f"{run_id}-window-scheduler", num_cpus=0, max_restarts=-1,
                                       get_if_exists=True).remote(cfg.window, cfg.sampler.num_steps, cfg.run.seed,
                                                                  cfg.cluster.state_store, run_id)
    learners, pg = start_learners(cfg, cfg_json)
    # Restartable (a lost shard is re-run, see gather_rollout) and named `<run>-rollout-<i>-<tag>` so operators
    # and chaos tests can find them; the tag keeps names unique when a run is resumed in the same namespace.
    restarts = cfg.rollout.max_restarts if cfg.cluster.weight_sync == "object_store" else 0
    tag = uuid.uuid4().hex[:6]
    workers = [WorkerActor.options(name=f"{run_id}-rollout-{i}-{tag}", num_cpus=cfg.rollout.num_cpus,
                                   num_gpus=cfg.rollout.num_gpus, max_restarts=restarts,
                                   runtime_env=malloc_runtime_env()).remote(cfg_json, i)
               for i in range(cfg.rollout.num_workers)]
    return Cluster(scheduler, learners, workers, sharded=cfg.learner.sharding == "fsdp", placement_group=pg)


def start_learners(cfg: Config, cfg_json: str) -> tuple[list, object | None]:
    """One learner actor, or K ranks in a placement group (one bundle each) joined in a torch.distributed group.

    Plain actors in a placement group rather than Ray Train's TorchTrainer: the driver steps the learner once per
    iteration, between rollouts and weight broadcasts, where a trainer runs its own loop to the end.
    """
    lc = cfg.learner
    if lc.num_workers == 1:
        return [LearnerActor.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                                     runtime_env=malloc_runtime_env()).remote(cfg_json)], None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(lc.num_workers)], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=cfg.cluster.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"the learner's {lc.num_workers} ranks ({bundle} each) could not be placed within "
                           f"{cfg.cluster.placement_timeout_s:.0f} s (cluster.placement_timeout_s): the cluster lacks "
                           "the resources; lower learner.num_workers, learner.num_cpus or learner.num_gpus") from None
    ranks = [LearnerActor.options(
        num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, runtime_env=malloc_runtime_env(),
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)).remote(cfg_json, r)
        for r in range(lc.num_workers)]
    address = ray.get(ranks[0].channel_address.remote())
    ray.get([rank.join_group.remote(address, lc.num_workers) for rank in ranks])
    return ranks, pg


def evaluate(cl: Cluster, cfg: Config, iteration: int, log: MetricsLog) -> dict:
    """The held-out evaluation (`learner.evaluation`), its prompts shared out among the rollout workers, which hold
    the weights of the last broadcast (checked: `weight_version`), and a 16-cell sample grid spanning the prompt set
    (fixed prompts and noise: the cells compare over time). Each prompt keeps its own noise whichever worker
    samples it, so the result does not depend on the number of workers.

    The grid is saved as <run>/samples/<iter>.png + .json; `rec["samples"]` (its path relative to the run)
    is how observers, the record and the report find it.
    """
    prompts = run_prompts(cfg)
    theta = None  # DiffusionNFT: the workers sample with the lagged φ; the run's policy θ is what gets scored
    if cfg.grpo.objective == "nft":
        theta = ray.put(ray.get([rank.evaluated_weights.remote() for rank in cl.gathering()])[0])
    parts = ray.get([w.evaluate.remote(shard, 16, theta) for w, shard in zip(cl.workers, shards(len(prompts),
                                                                                                len(cl.workers)))])
    stale = sorted({p["weight_version"] for p in parts} - {cl.version})
    if stale:
        raise RuntimeError(f"evaluation ran with weights versions {stale}, expected {cl.version}")
    settings = evaluation_settings(cfg)
    res = combine(prompts, parts, verifier=settings["verifier"], grid=16, num_steps=settings["num_steps"],
                  shift=settings["shift"], seed=settings["seed"], hybrid_fraction=1.0)
    rec = {**eval_record(iteration, res), "weight_version": cl.version}
    grid = res.get("grid")
    if grid is not None:
        rec["samples"] = save_grid(log.path.parent, iteration, grid["images"], grid["prompts"], grid["scores"])
    log.write(rec)
    return rec


def stop_actors(cl: Cluster) -> None:
    for actor in (*cl.learners, *cl.workers):
        ray.kill(actor)
    if cl.placement_group is not None:
        ray.util.remove_placement_group(cl.placement_group)
    ray.kill(cl.scheduler, no_restart=True)


def node_cores() -> int:
    """CPUs of the smallest alive node Ray reports (a local Ray: this machine's, or `cluster.num_cpus`)."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(1, min((c for c in cpus if c > 0), default=1))


def run_loop(cfg: Config, out: Path, run_id: str, resume: bool = False, observers: list[Observer] = (), *,
             resources_checked: bool = False) -> dict:
    """`resources_checked`: the caller ran `cluster_checks.check_resources` (the driver does, before the rewards deploy)."""
    if 0 in (cfg.rollout.num_threads, cfg.learner.num_threads) or (cfg.run.async_rollout
                                                                      and cfg.learner.overlap_threads == -1):
        cores = node_cores()  # auto: from the cores of a node
        cfg = auto_threads(cfg, cores)
        dump_config(cfg, out / "config.json")  # the run records the counts it used
        extra = f" (+{cfg.learner.overlap_threads} once the overlapping rollout is done)" \
            if cfg.run.async_rollout and cfg.learner.overlap_threads else ""
        print(f"threads: {cfg.rollout.num_threads} per rollout worker, {cfg.learner.num_threads}{extra} per learner "
              f"rank ({cores} cores per node, {'async' if cfg.run.async_rollout else 'sync'})", flush=True)
    cl = start_actors(cfg, run_id, resources_checked=resources_checked)
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
        meta = ray.get([rank.restore.remote(str(ckpt)) for rank in cl.learners])[0]
        start = int(meta["iteration"]) + 1
        log.truncate_after(start - 1)
        rewind(observers, start - 1)
        print(f"resumed from {ckpt} (iteration {meta['iteration']}, weight version {meta['version']})", flush=True)
    # the window store follows the checkpoint (or the fresh start): a persistent store (file://, redis://) may
    # hold an iteration that a crash never checkpointed, or a previous attempt's state in the same namespace
    ray.get(cl.scheduler.restore.remote(start - 1))
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
    faults = {"learner_restarts": 0, "replayed_iterations": 0}
    m = start
    while m < cfg.run.iterations:
        try:
            evaluated, launched = _one_iteration(cl, cfg, out, run_id, log, progress, observers, prompts, pending, m,
                                                 t_prev_end, faults)
        except ray.exceptions.RayError as e:  # a dead rank, or a surviving rank's collective failing with it
            if learners_alive(cl):
                raise  # not the learner: a rollout worker's loss its retries did not absorb, a reward, a bug
            resume_at = recover_learner(cl, cfg, out, log, m, faults["learner_restarts"], e)
            rewind(observers, resume_at - 1)
            faults["learner_restarts"] += 1
            faults["replayed_iterations"] += m - resume_at
            m, pending, t_prev_end = resume_at, launch_rollout(cl, cfg, prompts, resume_at), time.perf_counter()
            continue
        last_eval = evaluated or last_eval
        t_prev_end = time.perf_counter()
        m += 1
        if m < cfg.run.iterations:
            pending = launched or launch_rollout(cl, cfg, prompts, m)
    base_eval = next((r for r in log.records() if r.get("kind") == "eval" and r["iteration"] < 0), None)
    return {"base_eval": base_eval, "final_eval": last_eval, "output_dir": str(out)}


def _one_iteration(cl: Cluster, cfg: Config, out: Path, run_id: str, log: MetricsLog, progress: Progress,
                   observers: list[Observer], prompts: PromptSource, pending, m: int, t_prev_end: float,
                   faults: dict) -> tuple[dict | None, Rollout | None]:
    """Iteration m from its launched rollout `pending` to its record, evaluation and checkpoint.

    -> (the evaluation record, if one ran; in async mode the rollout of m+1, launched before the update)."""
    # from this rollout's launch (sync) or the previous iteration's end (async: the rollout overlapped it);
    # evaluation and checkpoint time are not part of an iteration
    t_iter, ro, t_wait = max(pending.started, t_prev_end), pending, time.perf_counter()
    refs = gather_rollout(cl, cfg, ro)  # this iteration's rollout is done (lost shards re-run)…
    launched = None
    if rollout_overlaps_update(cfg, m):  # async, unless m ends with a checkpoint (then m+1 samples with its weights)
        launched = launch_rollout(cl, cfg, prompts, m + 1)  # …start the next one before updating
    t_update = time.perf_counter() if cfg.run.async_rollout else t_wait
    # async: the ranks take the workers' cores once the next rollout's shards are done (a list: Ray passes the refs
    # themselves, not their values)
    overlap = ([sh.batch for sh in launched.shards], max(0, cfg.learner.overlap_threads)) if launched else None
    stats = all_ranks([rank.update.remote(*refs, num_groups=cfg.num_groups, overlap=overlap)
                       for rank in cl.learners])[0]
    samples = stats.pop("samples", None)  # a few rollout images for the observers (`rollout.log_images`)
    t_next = 0.0
    if launched:  # async: the workers load the weights after the next rollout's shards, so wait for those first; the
        # broadcast's time is then the broadcast's (it read 6 s of rollout in a 0.5 s iteration's record before)
        t_next = time.perf_counter()
        ray.wait([sh.batch for sh in launched.shards], num_returns=len(launched.shards))
        t_next = time.perf_counter() - t_next
    _, t_sync, resent = broadcast(cl, cfg.cluster.weight_sync == "collective", cfg.rollout.restart_timeout_s)
    now = time.perf_counter()
    rec = {"kind": "train", "iteration": m, "window_start": ro.window[0], "window_size": ro.window[1], **stats,
           "rollout_retries": ro.retries, "weight_sync_retries": resent, **faults, "broadcast_s": t_sync,
           "next_rollout_wait_s": t_next, "wait_update_s": now - t_update - t_sync - t_next,
           "iteration_seconds": now - t_iter}
    log.write(rec)
    progress.report(rec)
    for obs in observers:
        obs.on_iteration(rec, samples)
    done, evaluated = m + 1 == cfg.run.iterations, None
    if cfg.run.eval_every and (m + 1) % cfg.run.eval_every == 0 or done:
        evaluated = evaluate(cl, cfg, m, log)
        progress.report_eval(evaluated)
        for obs in observers:
            obs.on_eval(evaluated)
    if checkpoints_after(cfg, m):
        all_ranks([rank.save.remote(str(out / "checkpoints"), {"run_id": run_id}) for rank in cl.gathering()])
    return evaluated, launched

