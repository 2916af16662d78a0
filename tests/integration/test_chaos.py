"""A chaos soak (slow): 30 iterations in which rollout workers, reward replicas and the learner are each killed three
times at iterations drawn from a seeded schedule; every train record and the final weights equal those of the
unfaulted in-process run.

    python -m pytest -m slow tests/integration/test_chaos.py -q      # about 5 minutes on two cores

Faults: a rollout worker `ray.kill`ed (Ray restarts it; its shard is re-run, or it is sent the missed broadcast), a
reward replica `ray.kill`ed (Serve replaces it; the other replica and the client's retries carry the requests), the
learner's process SIGKILLed (the driver restarts it from its last checkpoint and replays the iterations since).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from learner.driver.loop import run_loop
from tests.integration.conftest import own_reward_service
from tests.integration.test_faults import assert_same_training, reference_run
from tests.integration.test_learner_fault import learner_pids
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint, train_records  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ITERATIONS, KINDS = 30, ("worker", "replica", "learner")


def schedule(seed: int = 2026) -> list[tuple[int, str]]:
    """Nine faults, three of each kind, at distinct iterations 2…28, in a seeded order."""
    rng = np.random.default_rng(seed)
    at = sorted(int(i) for i in rng.choice(np.arange(2, ITERATIONS - 1), size=9, replace=False))
    kinds = list(rng.permutation([k for k in KINDS for _ in range(3)]))
    return list(zip(at, kinds, strict=True))


def inject(kind: str, run_id: str, app: str, rng: np.random.Generator) -> str:
    import ray

    if kind == "learner":
        pids = learner_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return f"learner pid {pids}"
    if kind == "worker":
        names = sorted(n for n in ray.util.list_named_actors() if n.startswith(f"{run_id}-rollout-"))
        victim = names[int(rng.integers(len(names)))]
        ray.kill(ray.get_actor(victim), no_restart=False)
        return victim
    names = sorted(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                   if n["name"].startswith(f"SERVE_REPLICA::{app}#reward_shapes_verifier#"))
    victim = names[int(rng.integers(len(names)))]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim


def chaos(metrics: Path, run_id: str, app: str, plan: list[tuple[int, str]], done: list, stop: threading.Event):
    """Each fault once, when a train record of its iteration (or later) first appears."""
    rng = np.random.default_rng(7)
    seen = -1
    while plan and not stop.wait(0.05):
        if metrics.exists():
            its = [r["iteration"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]
            seen = max([seen, *its])
        if seen >= plan[0][0]:
            it, kind = plan.pop(0)
            done.append((it, kind, inject(kind, run_id, app, rng)))
            time.sleep(1.0)  # let Ray notice before the next fault


@pytest.mark.timeout(1500)
def test_chaos_soak_loses_nothing(ray_cluster, small_checkpoint, tmp_path):  # noqa: F811
    cfg = small_cfg(small_checkpoint, tmp_path, "mixgrpo", f"run.iterations={ITERATIONS}", "learner.checkpoint_every=4",
                    "learner.max_restarts=5", "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1, num_replicas: 2}]",
                    "window.shift_interval=4")
    plan, done, stop = schedule(), [], threading.Event()
    assert len(plan) == 9 and {k for _, k in plan} == set(KINDS)
    t0 = time.monotonic()
    with own_reward_service(cfg.reward):
        thread = threading.Thread(target=chaos, args=(tmp_path / "metrics.jsonl", "t-chaos", cfg.reward.server.app_name,
                                                      list(plan), done, stop), daemon=True)
        thread.start()
        try:
            run_loop(cfg, tmp_path, "t-chaos")
        finally:
            stop.set()
            thread.join(10)
    print(f"chaos soak: {len(done)} faults in {time.monotonic() - t0:.0f} s: {done}")
    assert [(i, k) for i, k, _ in done] == plan, done  # every scheduled fault was injected
    recs = train_records(tmp_path)
    assert [r["iteration"] for r in recs] == list(range(ITERATIONS))
    assert recs[-1]["learner_restarts"] == 3 and recs[-1]["replayed_iterations"] >= 3
    assert sum(r["rollout_retries"] + r["weight_sync_retries"] for r in recs) >= 1  # the workers' losses surfaced
    assert_same_training(recs, *reference_run(cfg), tmp_path / "checkpoints" / f"iter_{ITERATIONS - 1:06d}")
