"""Build and run the reward Serve application.

    app = build_app([RewardSpec(name="shapes_reward", num_replicas=2)], RewardServerConfig())
    serve.run(app, name="rewards", route_prefix="/")          # or: python -m reward_servers --port 8000
    serve run deploy/serve_rewards.yaml                        # import path reward_servers.app:app_builder

One `reward_<name>` deployment per RewardSpec (own replicas, batching, backpressure) behind one FastAPI
ingress (`RewardIngress`). The bearer token is read here, on the side that builds the app, from the env
var named by `RewardServerConfig.auth_token_env`; only its SHA-256 travels to the ingress replica, so the
token never appears in the Serve config, the controller's checkpoint or the dashboard.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from ray import serve

from reward_servers.deployments import ingress_deployment
from reward_servers.http_api import token_digest
from reward_servers.scorers import check_reward_specs
from services.config import RewardServerConfig, RewardSpec, load_config


def build_app(specs: list[RewardSpec], server: RewardServerConfig) -> serve.Application:
    """The Serve application: an ingress plus one deployment per spec. Names must be registered scorers."""
    if not specs:
        raise ValueError("build_app needs at least one RewardSpec")
    check_reward_specs(specs)
    token = os.environ.get(server.auth_token_env)
    return ingress_deployment(specs, server, token_digest(token) if token else None)


def patient_proxy_start() -> None:
    """Before a local `ray.init`: Serve's controller kills its HTTP proxy after 3 readiness checks of 5 s each, and
    on a two-core machine busy with anything else the proxy takes longer to start, so `serve.start` failed with a
    traceback (2 of 2 runs beside two pre-training processes; with 30 s it started). The controller inherits this
    environment from the process that starts the local Ray; a variable already set wins."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")


def serve_is_running() -> bool:
    """Whether this Ray cluster already runs Serve (its controller): `serve.start` then joins it, proxies and all."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def check_port_free(server: RewardServerConfig) -> None:
    """Before this cluster's first `serve.start`: something already listening on reward.server.host:port (another
    cluster's Serve proxy, another program) would share the port with the proxy Serve starts here, which binds it
    with SO_REUSEPORT, so requests would be split between the two services at random. Refuse, naming the field.
    A cluster that runs Serve already keeps its own proxy: not checked."""
    import socket

    if serve_is_running():
        return
    host = "127.0.0.1" if server.host in ("0.0.0.0", "", "::") else server.host
    try:
        with socket.create_connection((host, server.port), timeout=1.0):
            pass
    except OSError:
        return  # nothing answers there: free
    from services.config import ConfigError

    raise ConfigError(f"reward.server.port: {server.host}:{server.port} is already in use on this machine (another "
                      f"reward service or program listens there, and Serve would share the port with it); pass "
                      f"another port (reward.server.port=N, or --port N) or stop what listens there")


def preflight_rewards(specs: list[RewardSpec], *, local: bool) -> None:
    """Before Ray starts: the rewards' names and weight folders (`check_reward_specs`, `check_reward_weights`)."""
    from reward_servers.scorers import check_reward_weights

    check_reward_specs(specs)
    check_reward_weights(specs, local=local)


class AppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` block of a Serve config file).

    Either `config`, a run-config YAML whose `reward` section is used, or `rewards` (+ `server`) inline;
    inline values win over the file's.
    """

    model_config = ConfigDict(extra="forbid")
    config: str | None = None
    rewards: list[RewardSpec] | None = None
    server: RewardServerConfig | None = None

    @model_validator(mode="after")
    def _something(self) -> AppArgs:
        if self.config is None and self.rewards is None:
            raise ValueError("give 'config' (a run config YAML) or 'rewards' (a list of reward specs)")
        return self


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder for `serve run` / `serve deploy` (import path reward_servers.app:app_builder)."""
    parsed = AppArgs.model_validate(args)
    section = load_config([parsed.config]).reward if parsed.config else None
    specs = parsed.rewards if parsed.rewards is not None else section.rewards
    server = parsed.server or (section.server if section else RewardServerConfig())
    return build_app(specs, server)


def serve_forever(specs: list[RewardSpec], server: RewardServerConfig, *, address: str | None = None,
                  ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Start Ray (or join `address` / RAY_ADDRESS), deploy the app on server.host:port and block.

    Returns after SIGINT/SIGTERM (or `stop` being set), having shut Serve down. Local clusters started by
    Ray 2.60 use token auth for the dashboard; set RAY_AUTH_MODE=disabled for a throwaway local cluster.
    """
    import ray

    patient_proxy_start()
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), namespace="mixgrpo-rewards")
    try:
        check_port_free(server)
    except BaseException:
        ray.shutdown()
        raise
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(build_app(specs, server), name=server.app_name, route_prefix=server.route_prefix)
    print(f"reward service up: http://{server.host}:{server.port}{server.route_prefix.rstrip('/')}/docs "
          f"(rewards: {', '.join(s.name for s in specs)})", flush=True)
    if ready is not None:
        ready.set()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
