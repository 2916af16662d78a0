"""What `--resume` may change, and what it checks before Ray starts.

A resumed run continues the same training: its optimizer state (whose learning rate and betas the checkpoint
restores), its window schedule, its seeds and its method. So an override on `--resume` may change only how the run
is carried out (resources, threads, where Ray and the rewards run, how long, how often it checkpoints and
evaluates), never what it computes; the rest is refused, naming the field, rather than half-applied (an lr override
was overwritten by the optimizer state while config.json recorded it for the whole run) or recorded for iterations
that ran without it. The latest checkpoint is verified (every file against its sha256) before Ray and Serve start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learner.outputs.metrics import MetricsLog
from learner.training import CheckpointError, latest_checkpoint, verify_checkpoint
from services.config import Config, ConfigError

# Fields (dotted; a trailing "." is a whole section) that do not change what a run computes.
OPERATIONAL = (
    "run.iterations", "run.eval_every", "run.wandb_project", "run.output_dir",
    "cluster.", "reward.server.",
    "model.device", "model.gradient_checkpointing",
    "rollout.num_cpus", "rollout.num_gpus", "rollout.num_threads", "rollout.max_restarts", "rollout.max_retries",
    "rollout.restart_timeout_s", "rollout.log_images",
    "learner.num_cpus", "learner.num_gpus", "learner.num_threads", "learner.overlap_threads",
    "learner.checkpoint_every", "learner.max_restarts",
    "learner.num_workers",  # a K-rank checkpoint resumes exactly on K' ranks (tests/integration/test_learner_group.py)
)
# Serving fields of each reward (replicas, batching, resources): the same scorer behind another deployment.
REWARD_SERVING = ("num_replicas", "autoscaling", "num_cpus", "num_gpus", "max_batch_size", "batch_wait_timeout_s",
                  "max_ongoing_requests", "max_queued_requests")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.0.c": leaf}: dict keys and list indices joined by dots."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    if not out:
        out[prefix] = value  # an empty dict or list is a value of its own
    return out


def operational(key: str) -> bool:
    if any(key == f or (f.endswith(".") and key.startswith(f)) for f in OPERATIONAL):
        return True
    parts = key.split(".")
    return parts[:2] == ["reward", "rewards"] and len(parts) >= 4 and parts[3] in REWARD_SERVING


def resume_changes(saved: Config, new: Config) -> list[str]:
    """'field: saved → new' for every change an override on --resume makes to what the run computes."""
    a, b = flatten(saved.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    return [f"{k}: {a.get(k, '(unset)')!r} → {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not operational(k)]


def check_resume(out: Path, saved: Config, new: Config) -> dict:
    """Before Ray starts: refuse overrides that change the training, a run with no checkpoint or an altered one,
    and a run that has nothing left to do. Returns the checkpoint's meta."""
    if changes := resume_changes(saved, new):
        raise ConfigError(f"--resume {out}: a resumed run continues the same training, so these overrides are "
                          f"refused: {'; '.join(changes)}. On --resume change only how the run is carried out "
                          f"(run.iterations, run.eval_every, resources and threads, cluster.*, reward.server.*, "
                          f"learner.checkpoint_every), or start a new run")
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"--resume {out}: no checkpoint in {out / 'checkpoints'} (the run stopped before its first, "
                          f"every learner.checkpoint_every={saved.learner.checkpoint_every} iterations): start it "
                          f"again in a new folder")
    try:
        meta = verify_checkpoint(ckpt)
    except CheckpointError as e:
        raise ConfigError(f"--resume {out}: {e}; move that folder aside to resume from the one before it") from None
    try:
        MetricsLog(out / "metrics.jsonl").records()  # a damaged record file: said now, not after Ray starts
    except ValueError as e:
        raise ConfigError(f"--resume {out}: {e}") from None
    done = int(meta["iteration"]) + 1
    if done >= new.run.iterations:
        raise ConfigError(f"--resume {out}: its checkpoint {ckpt.name} is the end of the run ({done} of "
                          f"run.iterations={new.run.iterations}); pass run.iterations=N (N > {done}) to train further")
    return meta
