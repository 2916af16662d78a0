"""The window scheduler survives faults: Ray GCS fault tolerance with an external Redis, and an actor
restart that restores its state from the Redis state store.

`test_scheduler_actor_restart_restores_state_from_store` (fast, on the session's `ray_cluster`): a
named SchedulerActor with max_restarts=1 is killed with `ray.kill(no_restart=False)`; once a new
process serves it, it reports the same iteration and window with a redis:// store (re-read in
`__init__`), and starts over with the memory store (the control).

`test_detached_scheduler_survives_gcs_restart` (slow, 30-80 s on two busy cores) demonstrates what deploy/README.md
describes, on a real `ray start --head` with `RAY_REDIS_ADDRESS` and `RAY_external_storage_namespace`:
a driver subprocess creates a detached named SchedulerActor (store "memory", so its state exists only in
the actor process) and advances it to iteration 7; the test kills `gcs_server` (SIGKILL) and starts it
again with the command line and environment it had (what a restarted head Pod or a supervisor does;
`ray start` does not restart a dead GCS itself). The new GCS reloads the actor table from Redis: a new
driver finds the actor by name, it is the same process (same pid), and it still reports iteration 7
with the same window. Drivers run as subprocesses so this test's process holds no Ray connection.

Not demonstrated here: the head *node* going away (raylet and actors on it die with it; on Kubernetes
the workers' raylets wait for the new head), a password-protected Redis, and the control case
(without RAY_REDIS_ADDRESS a restarted GCS knows no actors). Cleanup kills only this test's processes
(found by its temp dir) instead of `ray stop --force`, which would stop every Ray on the machine,
including the session's `ray_cluster` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.redis_server import free_port, redis_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WINDOW = dict(size=4, shift_interval=2, stride=1)  # the `window` config section; 16 sampling steps, seed 0

CREATE = f"""
import json, os, sys, ray
from learner.driver.actors import SchedulerActor
from services.config import WindowConfig
ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
actor = SchedulerActor.options(name=sys.argv[3], lifetime="detached", num_cpus=0).remote(
    WindowConfig(**{WINDOW!r}), 16, 0, "memory", "gcs-ft-demo")
for i in range(8):
    ray.get(actor.advance.remote(i), timeout=60)
"""
LOOKUP = """
import json, os, sys, ray
ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
actor = ray.get_actor(sys.argv[3], namespace=sys.argv[2])
"""
REPORT = """
pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
print(json.dumps({"current": ray.get(actor.current.remote(), timeout=60), "pid": pid}))
"""


def expected(iteration: int) -> list:
    """What `current()` returns at `iteration`, as JSON: [iteration, [start, size]]."""
    from services.config import WindowConfig
    from services.scheduler import WindowScheduler

    return [iteration, list(WindowScheduler(WindowConfig(**WINDOW), num_steps=16).window(iteration))]


def as_json(current: tuple) -> list:
    iteration, window = current
    return [iteration, None if window is None else list(window)]


# ---------------------------------------------------------------- fast: actor restart + state store


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)


def _wait_restarted(actor, old_pid: int, timeout_s: float = 120.0) -> None:
    """`ray.kill` is asynchronous: wait until calls are served by a new actor process."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _pid(actor) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dying or restarting
        time.sleep(0.2)
    raise TimeoutError(f"the actor did not restart within {timeout_s} s")


@pytest.mark.parametrize("store", ["redis", "memory"])
def test_scheduler_actor_restart_restores_state_from_store(ray_cluster, tmp_path, store):
    """Killed with restarts allowed, the actor re-runs __init__: with a Redis store it comes back at the
    same iteration and window; with the memory store (the control) it starts over."""
    ray = ray_cluster
    from learner.driver.actors import SchedulerActor
    from services.config import WindowConfig

    with redis_server(tmp_path) if store == "redis" else nullcontext("memory") as url:
        name = f"scheduler-{uuid.uuid4().hex[:8]}"
        actor = SchedulerActor.options(name=name, max_restarts=1, num_cpus=0).remote(WindowConfig(**WINDOW), 16, 0, url, name)
        try:
            for i in range(8):
                ray.get(actor.advance.remote(i), timeout=60)
            assert as_json(ray.get(actor.current.remote(), timeout=60)) == expected(7)
            old_pid = _pid(actor)
            ray.kill(actor, no_restart=False)
            _wait_restarted(actor, old_pid)
            after = as_json(ray.get(actor.current.remote(), timeout=60))
            assert after == (expected(7) if store == "redis" else [-1, None])
            if store == "redis":  # and it carries on from there
                assert list(ray.get(actor.advance.remote(8), timeout=60)) == expected(8)[1]
        finally:
            ray.kill(actor)


# ---------------------------------------------------------------- slow: GCS restart on external Redis


def _driver(script: str, address: str, name: str, env: dict) -> dict:
    """Run a driver script in a subprocess; its last line of output is {"current": ..., "pid": ...}."""
    out = subprocess.run([sys.executable, "-c", script + REPORT, address, "gcs-ft-demo", name], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"driver failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_ports(n: int) -> list[int]:
    """n distinct free ports outside Ray's default worker port range 10002-19999 (`ray start` refuses those)."""
    ports: set[int] = set()
    while len(ports) < n:
        if (port := free_port()) not in range(10002, 20000):
            ports.add(port)
    return sorted(ports)


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _processes_of(temp_dir: str):
    """Every process of the Ray cluster rooted at temp_dir (by command line), with their descendants."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def _kill_cluster(temp_dir: str) -> None:
    import psutil

    procs = _processes_of(temp_dir)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


def _find(temp_dir: str, name: str):
    (process,) = [p for p in _processes_of(temp_dir) if p.name() == name]
    return process


@pytest.mark.slow
def test_detached_scheduler_survives_gcs_restart(tmp_path):
    psutil = pytest.importorskip("psutil")
    import redis

    storage_ns = f"mixgrpo-test-{uuid.uuid4().hex[:8]}"
    with redis_server(tmp_path) as url:
        temp_dir = tempfile.mkdtemp(prefix="rgft-", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
        redis_port = int(url.rsplit(":", 1)[1].split("/")[0])
        env = {**os.environ, "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}",
               "RAY_external_storage_namespace": storage_ns, "RAY_AUTH_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)
        flags = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
                 "metrics-export-port", "runtime-env-agent-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port")  # all explicit: no clash with another local Ray's defaults
        ports = dict(zip(flags, _free_ports(len(flags))))
        gcs_port = ports["port"]
        restarted = []
        try:
            start = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=1",
                                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                                    *(f"--{flag}={port}" for flag, port in ports.items()), f"--temp-dir={temp_dir}",
                                    "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
            assert start.returncode == 0, f"ray start failed:\n{start.stderr[-4000:]}"
            address = f"127.0.0.1:{gcs_port}"
            name = "window-scheduler"
            created = _driver(CREATE, address, name, env)
            assert created["current"] == expected(7)
            assert redis.Redis(port=redis_port).keys(f"RAY{storage_ns}@*"), "the GCS wrote nothing to Redis"

            gcs = _find(temp_dir, "gcs_server")
            cmdline, gcs_env = gcs.cmdline(), gcs.environ()
            gcs.kill()
            gcs.wait(timeout=15)
            # the raylet and the actor keep running while the GCS is down (up to the raylet's reconnect timeout)
            assert psutil.pid_exists(created["pid"])
            restarted.append(subprocess.Popen(cmdline, env=gcs_env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
            _wait_port(gcs_port)

            found = _driver(LOOKUP, address, name, env)
            assert found == created, "after the GCS restart: same iteration and window, same actor process"
        finally:
            _kill_cluster(temp_dir)  # the restarted GCS too: its command line names temp_dir
            for proc in restarted:
                proc.wait(timeout=15)
            shutil.rmtree(temp_dir, ignore_errors=True)
