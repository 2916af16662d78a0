"""Integration tests share tests/conftest.py's fixtures (the local Ray cluster `ray_cluster`)."""

from contextlib import contextmanager  # noqa: E402

_DEPLOYED: dict[str, str] = {}  # Serve app name → the RewardConfig (JSON) it was deployed with


@contextmanager
def shared_reward_service(cfg):
    """`reward_service(cfg)`, but deployed once per reward configuration and left running for the next test that
    asks for the same one (deploying the verifier takes ~20 s on two cores). Redeployed when another configuration
    is asked for, or when Serve was shut down or the app is not running (a module that shuts Serve down, a fault
    test). The session's `ray_cluster` fixture shuts Serve down at the end."""
    from ray import serve

    from reward_servers.service import reward_service

    name, key = cfg.server.app_name, cfg.model_dump_json()
    try:
        status = serve.status().applications.get(name)
    except Exception:  # Serve not started
        status = None
    if _DEPLOYED.get(name) != key or status is None or str(status.status) not in ("RUNNING", "ApplicationStatus.RUNNING"):
        if status is not None:
            serve.delete(name)
        with reward_service(cfg, keep=True):
            pass
        _DEPLOYED[name] = key
    yield


@contextmanager
def own_reward_service(cfg):
    """`reward_service(cfg)` for a test that deploys its own rewards: the app `shared_reward_service` may have left
    under the same name is deleted first (the service refuses to deploy over a running app)."""
    from ray import serve

    from reward_servers.service import reward_service

    try:
        running = cfg.server.app_name in serve.status().applications
    except Exception:  # Serve not started
        running = False
    if running:
        serve.delete(cfg.server.app_name)
        _DEPLOYED.pop(cfg.server.app_name, None)
    with reward_service(cfg) as handle:
        yield handle
