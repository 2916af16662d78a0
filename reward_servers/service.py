"""The training job's reward service: deploy the configured rewards on Serve for the run, or use an
external service (transport=http), and take them down afterwards.

    with reward_service(cfg.reward):      # inside a Ray session
        ...                               # rollout workers score through handles or HTTP
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from services.config import ConfigError, RewardConfig


@contextmanager
def reward_service(cfg: RewardConfig, *, keep: bool = False):
    """Deploys `cfg.rewards` as the Serve app `cfg.server.app_name` unless an external URL is used."""
    if cfg.server.transport == "http":
        yield None  # an external service (e.g. a RayService): nothing to deploy
        return
    from ray import serve

    from .app import build_app, check_port_free

    # Serve's own INFO lines (the controller's and proxy's, and the driver's "Started Serve", "Connecting to existing
    # Serve app … will not be applied" after serve.start, "Deleting app") and per-request access logs would drown the
    # training progress in the job's output; they stay in the log files under /tmp/ray/session_latest/logs/serve,
    # and warnings still show
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    check_port_free(cfg.server)
    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port}, logging_config={"log_level": "WARNING"})
    refuse_a_running_app(cfg.server.app_name)
    handle = serve.run(build_app(cfg.rewards, cfg.server), name=cfg.server.app_name,
                       route_prefix=cfg.server.route_prefix,
                       logging_config={"enable_access_log": False, "log_level": "WARNING"})
    print(f"reward service: {', '.join(r.name for r in cfg.rewards)} on "
          f"http://{cfg.server.host}:{cfg.server.port}{cfg.server.route_prefix}", flush=True)
    try:
        yield handle
    finally:
        if not keep:
            serve.delete(cfg.server.app_name)
            if not serve.status().applications:  # on a shared cluster other apps keep their Serve instance
                serve.shutdown()


def refuse_a_running_app(name: str, wait_s: float = 30.0) -> None:
    """A job never replaces a Serve app it did not deploy: `serve.run` under a running app's name would redeploy it
    with this job's rewards and settings (dropping a standalone service's token), and the job's end would delete it.
    An app still being deleted is waited for. Raises ConfigError naming the ways out."""
    from ray import serve

    deadline = time.monotonic() + wait_s
    while (status := serve.status().applications.get(name)) is not None and str(status.status).endswith("DELETING"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if status is not None:
        raise ConfigError(
            f"a Serve app named {name!r} already runs on this cluster ({str(status.status).split('.')[-1]}), "
            "deployed by another job or `python -m reward_servers`; this job would replace it and delete it at its "
            f"end. Use that service (reward.server.transport=http reward.server.url=http://<host>:<port>) or give "
            f"this job its own app: reward.server.app_name=<name> and a free reward.server.route_prefix")
