"""The job's reward service leaves a shared cluster's other Serve apps running, never deploys over one of them, and
takes Serve down when it was alone.

A job on a long-lived cluster (`ray job submit`) deploys its rewards as one Serve app; when it ends it deletes that
app. Shutting Serve down then would stop every other team's app on the cluster, so it only happens when no app is
left (a local run, where the job started Serve itself).
"""

from __future__ import annotations

import socket

import pytest

from services.config import ConfigError, load_config

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_job_deletes_its_app_and_keeps_serve_for_the_others(ray_cluster):
    from ray import serve

    from reward_servers.service import reward_service

    port = _free_port()
    cfg = load_config([], [f"reward.server.port={port}", "reward.server.app_name=job-rewards",
                           "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1}]"])

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Other:
        def __call__(self, request) -> str:
            return "still here"

    serve.shutdown()  # another module's Serve would keep its own HTTP port
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        other = serve.run(Other.bind(), name="another-team", route_prefix="/other")
        with reward_service(cfg.reward) as handle:
            assert handle is not None and set(serve.status().applications) == {"another-team", "job-rewards"}
        assert set(serve.status().applications) == {"another-team"}  # the job's app is gone, the other one is not
        assert other.remote(None).result(timeout_s=30) == "still here"
        # a job whose app name is taken (another job, `python -m reward_servers`) refuses instead of replacing it
        taken = load_config([], [f"reward.server.port={port}", "reward.server.app_name=another-team"])
        with pytest.raises(ConfigError, match=r"a Serve app named 'another-team' already runs .*reward\.server\.app_name"):
            with reward_service(taken.reward):
                pytest.fail("deployed over a running app")
        assert set(serve.status().applications) == {"another-team"}
        assert other.remote(None).result(timeout_s=30) == "still here"
        serve.delete("another-team")
        with reward_service(cfg.reward):  # alone on the cluster: Serve goes down with the job's app
            pass
        assert not serve.context._get_global_client(raise_if_no_controller_running=False)
    finally:
        serve.shutdown()


def test_a_port_another_program_listens_on_is_refused_before_serve_starts(ray_cluster):
    """Serve's proxy binds its port with SO_REUSEPORT, so a second cluster's proxy (or any program) on the same port
    went unnoticed and requests were split between the two at random; refused now, naming the field."""
    from ray import serve

    from reward_servers.service import reward_service

    serve.shutdown()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = load_config([], [f"reward.server.port={port}", "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1}]"])
        with pytest.raises(ConfigError, match=rf"reward\.server\.port: 127\.0\.0\.1:{port} is already in use"):
            with reward_service(cfg.reward):
                pytest.fail("deployed onto a taken port")
    assert not serve.context._get_global_client(raise_if_no_controller_running=False)  # Serve never started

