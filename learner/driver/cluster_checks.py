"""Before actors start, what the cluster must offer: Ray resources for every role, reward weight folders, the
Redis window store. Refused on a local Ray (nothing will join it), warned about on a cluster (nodes may join, and
they may see what the driver cannot).

    check_resources(cfg, ray.available_resources(), local=True)    # learner/main.py, before the rewards deploy
    check_state_store(cfg.cluster.state_store, local=True)
    check_reward_service(cfg.reward, local=True)                 # transport=http: reachable, serves the rewards
"""

from __future__ import annotations

import os
import sys

from services.config import Config, ConfigError, RewardConfig


def resource_demand(cfg: Config) -> dict[str, tuple[float, list[str]]]:
    """CPUs and GPUs the run's actors and replicas ask Ray for, with the fields each comes from."""
    r, lc = cfg.rollout, cfg.learner
    parts = [(r.num_workers, r.num_cpus, r.num_gpus, "rollout.num_workers × rollout.num_{}"),
             (lc.num_workers, lc.num_cpus, lc.num_gpus, "learner.num_workers × learner.num_{}")]
    if cfg.reward.server.transport == "handle":  # the job deploys its rewards (http: another service holds them)
        parts += [(s.num_replicas, s.num_cpus, s.num_gpus, f"reward.rewards.{i}.num_replicas × num_{{}}")
                  for i, s in enumerate(cfg.reward.rewards)]
    out = {}
    for key, unit in (("CPU", "cpus"), ("GPU", "gpus")):
        used = [(n * (c if key == "CPU" else g), f.format(unit)) for n, c, g, f in parts]
        out[key] = (sum(v for v, _ in used), [f for v, f in used if v])
    return out


def resource_shortfall(cfg: Config, available: dict[str, float]) -> str | None:
    """Why the run's actors would wait for resources the cluster does not have now (Ray waits without an error),
    or None. An autoscaling cluster may still add them; the driver prints this rather than refusing."""
    lines = []
    for key, (need, fields) in resource_demand(cfg).items():
        have = float(available.get(key, 0.0))
        if need > have + 1e-9:
            lines.append(f"{need:g} {key} asked ({' + '.join(fields)}), the cluster has {have:g}")
    return "; ".join(lines) or None


def check_resources(cfg: Config, available: dict[str, float], *, local: bool) -> None:
    """Before anything asks Ray for resources: a local Ray without the GPUs (or CPUs) the config asks for would wait
    forever (Serve's replicas first), and a reward replica without its weight folder fails only inside Serve's
    deploy, so refuse; a cluster may still add nodes, and its reward replicas may see folders this node does not, so
    warn (once: the driver checks before the rewards deploy and tells `run_loop` it did). A weight-loading reward
    with no model_path at all is refused everywhere."""
    from reward_servers.scorers import check_reward_weights

    if cfg.reward.server.transport == "handle":  # the job's own reward service (http: another service's weights)
        check_reward_weights(cfg.reward.rewards, local=local)
    short = resource_shortfall(cfg, available)
    if short and local:
        raise ConfigError(f"{short}: this local Ray has no more and nothing will join it; lower the fields named (on "
                          "a machine without GPUs: their num_gpus=0)")
    if short:
        print(f"warning: {short}. Actors wait until the cluster has them; lower the fields named or add nodes.",
              file=sys.stderr, flush=True)


def check_state_store(url: str, *, local: bool) -> None:
    """A Redis window store the scheduler actor could not reach failed 30 s in, deep inside the actor's start; try it
    from here first: refuse on a local Ray (the actor would connect from this machine), warn on a cluster (the
    scheduler's node may reach what the driver cannot)."""
    if not url.startswith("redis://"):
        return
    from services.state_store import open_store

    try:
        open_store(url, "preflight")
    except ConnectionError as e:
        if local:
            raise ConfigError(f"cluster.state_store: {e}") from None
        print(f"warning: cluster.state_store: {e} (from the driver; the window scheduler may still reach it)",
              file=sys.stderr, flush=True)


def check_reward_service(reward: RewardConfig, *, local: bool) -> None:
    """reward.server.transport=http: the service the rollout workers will call, asked once from here for its reward
    list (GET /v1/rewards, with the bearer token of `auth_token_env`). Before, an unreachable URL failed a minute in,
    after the first rollout, as a traceback. Unreachable or refusing: refused on a local Ray, warned on a cluster
    (the workers' network and environment may differ from the driver's); a configured reward the service does not
    serve is refused everywhere."""
    if reward.server.transport != "http":
        return
    import httpx

    url = (reward.server.url or "").rstrip("/")
    token = os.environ.get(reward.server.auth_token_env)
    try:
        r = httpx.get(f"{url}/v1/rewards", headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=10)
        problem = None if r.status_code == 200 else (
            f"reward.server.url: {url}/v1/rewards answers {r.status_code}"
            + (f" (set its bearer token in ${reward.server.auth_token_env})" if r.status_code == 401 else ""))
    except httpx.HTTPError as e:
        problem = f"reward.server.url: cannot reach the reward service at {url} ({type(e).__name__}: {e})"
    if problem:
        if local:
            raise ConfigError(problem)
        print(f"warning: {problem}, from the driver; the rollout workers may still reach it", file=sys.stderr,
              flush=True)
        return
    served = sorted(x.get("name") for x in r.json().get("rewards", []))
    if missing := [f"reward.rewards.{i}.name {s.name!r}" for i, s in enumerate(reward.rewards) if s.name not in served]:
        raise ConfigError(f"{', '.join(missing)}: not served by {url} (it serves {served})")
