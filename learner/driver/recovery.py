"""A learner that dies mid-run: new ranks, the last checkpoint restored, the iterations since then replayed.

The learner holds the only copy of the optimizer state, so a lost rank cannot simply be restarted in place: the
driver kills whatever is left of the learner (all ranks of a group, whose torch.distributed group is broken),
starts fresh ranks (`start_learners`, a new placement group), restores the newest checkpoint into them (none yet:
the starting weights, which every rank rebuilds), puts the window scheduler back at that iteration, loads the
restored weights into every rollout worker (an older version than they hold: `load_weights`, checksum-verified),
drops the metrics records after it and runs on from there. The replayed iterations repeat the originals exactly in
sync mode (prompts, windows and noise are functions of the run seed and the iteration; the rollouts sample with the
weights the originals sampled with), in async mode too: there the rollout after a checkpointed iteration samples with
the checkpoint's weights (`build.rollout_overlaps_update`), which is what the first replayed rollout has.

`learner.max_restarts` bounds how often; past it, or with collective weight sync (whose torch.distributed group
cannot re-admit a process), the run stops with an error naming the checkpoint to `--resume` from.
"""

from __future__ import annotations

from pathlib import Path

import ray

from learner.outputs.metrics import MetricsLog
from learner.training import latest_checkpoint
from services.config import Config

from .rollouts import Cluster


class LearnerLost(RuntimeError):
    """The learner (a rank of it) died and was not brought back."""


def all_ranks(refs: list[ray.ObjectRef]) -> list:
    """The results of every rank's call, failing as soon as any fails: a rank killed mid-update leaves the others
    blocked in a collective (until its timeout), so waiting for them in order would hang."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def learners_alive(cl: Cluster, timeout_s: float = 30.0) -> bool:
    """Whether every learner rank answers within `timeout_s` (a dead one raises RayActorError at once; one blocked
    in a collective with a dead peer does not answer)."""
    try:
        ray.get([rank.weight_version.remote() for rank in cl.learners], timeout=timeout_s)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def recover_learner(cl: Cluster, cfg: Config, out: Path, log: MetricsLog, iteration: int, restarts: int,
                    error: Exception) -> int:
    """Bring a lost learner back at its last checkpoint (see the module docstring). -> the iteration to run next."""
    from .loop import start_learners

    ckpt = latest_checkpoint(out / "checkpoints")
    where = (f"--resume {out} continues from {ckpt}" if ckpt is not None
             else f"no checkpoint was written yet: rerun the job (learner.checkpoint_every={cfg.learner.checkpoint_every})")
    if cfg.cluster.weight_sync == "collective":
        raise LearnerLost(f"the learner died at iteration {iteration} ({type(error).__name__}); with "
                          f"cluster.weight_sync=collective it cannot rejoin the workers' group: {where}") from error
    if restarts >= cfg.learner.max_restarts:
        raise LearnerLost(f"the learner died at iteration {iteration} ({type(error).__name__}) after "
                          f"{restarts} restart(s) (learner.max_restarts={cfg.learner.max_restarts}): {where}") from error
    for rank in cl.learners:
        ray.kill(rank, no_restart=True)
    if cl.placement_group is not None:
        ray.util.remove_placement_group(cl.placement_group)
    cl.learners, cl.placement_group = start_learners(cfg, cfg.model_dump_json())
    done = -1
    if ckpt is not None:
        meta = ray.get([rank.restore.remote(str(ckpt)) for rank in cl.learners])[0]
        done = int(meta["iteration"])
    ray.get(cl.scheduler.restore.remote(done))
    packet = [rank.get_weights.remote() for rank in cl.gathering()][0]
    versions = ray.get([w.load_weights.remote(packet) for w in cl.workers])
    expected = ray.get(cl.learner.weight_version.remote())
    if any(v != expected for v in versions):
        raise RuntimeError(f"after the learner's restart the workers hold versions {versions}, expected {expected}")
    cl.packet, cl.version = packet, expected
    log.truncate_after(done)
    replay = f"iterations {done + 1}…{iteration}" if iteration > done + 1 else f"iteration {iteration}"
    print(f"learner: lost at iteration {iteration} ({type(error).__name__}); restart {restarts + 1}/"
          f"{cfg.learner.max_restarts}: restored {ckpt.name if ckpt else 'the starting weights'}, replaying {replay}",
          flush=True)
    return done + 1
