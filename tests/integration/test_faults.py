"""Faults injected on a local Ray cluster: nothing accepted is lost, nothing is counted twice.

- a rollout worker killed mid-rollout: its groups are re-run on the other worker with the weights the
  rollout started with; Ray restarts the killed one, which gets the weights before it samples again. The
  run must equal a run without the fault: group noise is seeded by (run seed, iteration, group id), so
  the reference is the same training done in-process without Ray (`learner.driver.inprocess.run_inprocess`), shard for shard;
- a reward replica killed under load: Serve replaces it, the client retries what was in flight, and every
  score equals the rule verifier computed here (never a silent 0);
- the driver SIGKILLed after a checkpoint (slow: three processes start their own Ray): `--resume` gives the
  same windows, rewards and final weights as the uninterrupted reference.

The scheduler actor (with Redis) and the GCS are covered by test_gcs_fault_tolerance.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.driver.inprocess import run_inprocess
from learner.driver.loop import run_loop
from learner.training import load_checkpoint
from reward_servers.client import LocalRewards, RewardClient
from reward_servers.scorers import build_scorer
from reward_servers.service import reward_service
from services import shapes_world as sw
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Two verifier replicas (one can die while the other serves). A 1 s batch wait that two workers' requests
# never fill keeps every rollout waiting on its rewards for about a second: the worker is killed inside it.
REWARDS = ("reward.rewards=[{name: shapes_verifier, num_replicas: 2, num_cpus: 0.1, max_batch_size: 32, "
           "batch_wait_timeout_s: 1.0}]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault_cfg(ckpt, out, *extra):
    return small_cfg(ckpt, out, "mixgrpo", REWARDS, "run.iterations=4", *extra)


@pytest.fixture(scope="module")
def rewards_app(ray_cluster, small_checkpoint, tmp_path_factory):  # noqa: F811
    """The verifier on Serve (2 replicas) for this module's runs; the config it was deployed from."""
    from ray import serve

    cfg = fault_cfg(small_checkpoint, tmp_path_factory.mktemp("app"), f"reward.server.port={free_port()}")
    serve.shutdown()  # a Serve left by another module would keep its own HTTP port
    with reward_service(cfg.reward):
        yield cfg.reward


def reference_run(cfg):
    """`run_inprocess` (the run without Ray or faults) on the verifier scored in-process, one thread.

    -> (train statistics per iteration, windows per iteration, final trainable weights)
    """
    torch.set_num_threads(1)
    stats, windows, learner = run_inprocess(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    return stats, windows, learner.policy.trainable_state_dict()


def train_records(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_training(recs, ref_stats, ref_windows, ref_weights, final_ckpt):
    assert [(r["window_start"], r["window_size"]) for r in recs] == ref_windows
    for r, s in zip(recs, ref_stats, strict=True):
        for k in ("reward_mean/shapes_verifier", "reward_std/shapes_verifier", "loss", "grad_norm"):
            assert r[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), (r["iteration"], k)
    weights, _, _ = load_checkpoint(final_ckpt)
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6)


def kill_worker_after(path: Path, prefix: str, delay_s: float, stop: threading.Event) -> threading.Thread:
    """In the background: once `path` exists, wait `delay_s`, then kill the named worker (Ray restarts it)."""
    import ray

    def run():
        while not path.exists():
            if stop.wait(0.02):
                return
        time.sleep(delay_s)
        name = next(n for n in ray.util.list_named_actors() if n.startswith(prefix))
        ray.kill(ray.get_actor(name), no_restart=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_rollout_worker_killed_mid_rollout_loses_and_repeats_nothing(ray_cluster, rewards_app,
                                                                    small_checkpoint, tmp_path, mode, capsys):  # noqa: F811
    # async: the learner also takes a second thread once the overlapping rollout is done (learner.overlap_threads);
    # the reference run keeps one, so this also checks that the thread count does not change the numbers
    cfg = fault_cfg(small_checkpoint, tmp_path, f"run.async_rollout={mode == 'async'}",
                    f"learner.overlap_threads={int(mode == 'async')}", f"reward.server.port={rewards_app.server.port}")
    # Checkpoint 0 is written just before the next rollout starts (iteration 1's in both modes: in async mode a
    # checkpointed iteration's successor samples with the checkpoint's weights): 0.2 s later worker 0 is waiting for
    # its rewards.
    stop = threading.Event()
    killer = kill_worker_after(tmp_path / "checkpoints" / "iter_000000", f"t-kill-{mode}-rollout-0-", 0.2, stop)
    try:
        run_loop(cfg, tmp_path, f"t-kill-{mode}")
    finally:
        stop.set()
        killer.join(timeout=30)
    recs = train_records(tmp_path)
    lost = 1
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]  # training went on after the fault
    assert [r["rollout_retries"] for r in recs] == [int(m == lost) for m in range(4)]  # then worker 0 was back
    assert all(r["num_groups"] == cfg.num_groups for r in recs)  # merged: groups 0…P-1, each exactly once
    out = capsys.readouterr().out
    assert "lost groups [0, 1]" in out
    print("\n".join(line for line in out.splitlines() if line.startswith(("rollout:", "weight sync:", "[iter"))))
    ref_stats, ref_windows, ref_weights = reference_run(cfg)
    assert_same_training(recs, ref_stats, ref_windows, ref_weights, tmp_path / "checkpoints" / "iter_000003")


def test_reward_replica_killed_under_load_every_score_is_right(ray_cluster, rewards_app):
    import ray
    from ray import serve

    rng = np.random.default_rng(0)
    prompts = sw.sample_prompts(8, rng)
    images = np.stack([sw.render(p, rng) if i % 2 else sw.corrupt(p, sw.render(p, rng), rng, "recolor")
                       for i, p in enumerate(prompts)])
    expected = build_scorer("shapes_verifier").score(images, prompts)
    assert expected.max() == 1.0 and expected.min() < 1.0  # renders score 1, corruptions less: a 0 would show

    def replicas():
        return sorted(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                      if n["name"].startswith(f"SERVE_REPLICA::{rewards_app.server.app_name}#reward_shapes_verifier#"))

    def holding_requests(names, timeout_s):
        """The first of the replicas `names` seen with requests in flight (polled through Serve's own counter)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in names:
                if ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote()) > 0:
                    return name
            time.sleep(0.01)
        pytest.fail(f"no replica of {names} held a request within {timeout_s} s")

    before = replicas()
    assert len(before) == 2
    # 16 client threads keep 16 requests in flight; each batch waits 1 s to fill: the victim holds some
    with RewardClient(transport="handle", app_name=rewards_app.server.app_name, max_workers=16) as client:
        futures = [client.submit("shapes_verifier", images, prompts) for _ in range(48)]
        futures[0].result(timeout=120)
        victim = holding_requests(before, timeout_s=60)  # kill a replica while it holds requests (batches wait 1 s)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result(timeout=120) for f in futures]
        counts = client.metrics()
    for scores in results:
        np.testing.assert_array_equal(scores, expected)
    # The victim held requests when it died (holding_requests); who re-sent them varies from run to run: Serve's
    # router re-routes a request whose replica died (ray/serve/_private/router.py, ActorDiedError), and what
    # surfaces as an error is retried by RewardClient (counted in "retries"). Either way none failed or was 0.
    assert counts["requests"] == len(futures) and counts["failures"] == 0
    print(f"client after the kill: {counts}")
    deadline = time.monotonic() + 180  # Serve starts a replacement: back to two running replicas
    while time.monotonic() < deadline:
        now, status = replicas(), serve.status().applications[rewards_app.server.app_name]
        if (len(now) == 2 and victim not in now
                and status.deployments["reward_shapes_verifier"].replica_states.get("RUNNING") == 2):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replicas now {replicas()}; status {serve.status()}")


# ------------------------------------------------------------------------------------------ driver


def cli_overrides(ckpt, out, port):
    return [f"model.path={ckpt}", f"run.output_dir={out}", "sampler.num_steps=6", "window.size=2",
            "window.shift_interval=1", "grpo.group_size=4", "rollout.batch_size=16", "rollout.num_workers=2",
            "rollout.num_cpus=0.25", "learner.num_cpus=0.25", "learner.micro_batch_size=8", "run.eval_every=0",
            "run.eval_prompts=4", "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1}]",
            "learner.checkpoint_every=1", "run.iterations=4", "learner.lr=1e-3", "cluster.dashboard=false",
            "cluster.num_cpus=2", f"reward.server.port={port}"]


def driver(args, log):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    env |= {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "learner/main.py", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def end_session(proc):
    """SIGKILL what is left of the process group this test started (the driver's Ray processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_driver_killed_then_resume_equals_an_uninterrupted_run(small_checkpoint, tmp_path):  # noqa: F811
    from services.config import load_config

    out, log_path = tmp_path / "run", tmp_path / "driver.log"
    with open(log_path, "w") as log:
        proc = driver(cli_overrides(small_checkpoint, out, free_port()), log)
        try:
            deadline = time.monotonic() + 480
            while not (out / "checkpoints" / "iter_000001").exists():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)  # the driver, mid-run: no cleanup of any kind
            proc.wait(timeout=30)
        finally:
            end_session(proc)
    assert not (out / "checkpoints" / "iter_000003").exists()  # it really was interrupted
    with open(log_path, "a") as log:
        resumed = driver(["--resume", str(out), f"reward.server.port={free_port()}"], log)
        try:
            assert resumed.wait(timeout=540) == 0, log_path.read_text()[-3000:]
        finally:
            end_session(resumed)
    assert "resumed from" in log_path.read_text()
    recs = train_records(out)
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]  # records after the checkpoint were re-run once
    cfg = load_config([out / "config.json"])
    ref_stats, ref_windows, ref_weights = reference_run(cfg)
    assert_same_training(recs, ref_stats, ref_windows, ref_weights, out / "checkpoints" / "iter_000003")
