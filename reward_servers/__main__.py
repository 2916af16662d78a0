"""`python -m reward_servers --port 8000 [--config deploy/configs/x.yaml] [reward.rewards.0.num_replicas=2 ...]`

Starts the reward service on a local Ray (or joins RAY_ADDRESS / --address) and blocks until Ctrl-C.
The rewards and server settings come from the run config's `reward` section (defaults: the learned
shapes reward); --host/--port override `reward.server.host/port`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from reward_servers.app import preflight_rewards, serve_forever
from services.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reward_servers", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], help="run config YAML (repeatable, merged in order)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: reward.server.port)")
    p.add_argument("--host", default=None, help="bind address (default: reward.server.host)")
    p.add_argument("--address", default=None, help="Ray address to join (default: RAY_ADDRESS, else local)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. reward.rewards.0.num_replicas=2")
    a = p.parse_args(argv)
    overrides = list(a.overrides)
    if a.port is not None:
        overrides.append(f"reward.server.port={a.port}")
    if a.host is not None:
        overrides.append(f"reward.server.host={a.host}")
    try:
        cfg = load_config(a.config, overrides).reward
        local = not (a.address or os.environ.get("RAY_ADDRESS"))
        preflight_rewards(cfg.rewards, local=local)  # before Ray starts: one line, not Serve's deploy traceback
        serve_forever(cfg.rewards, cfg.server, address=a.address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
