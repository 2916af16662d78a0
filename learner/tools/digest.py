"""A digest of a short in-process run: did a change keep training bitwise the same?

    python -m learner.tools.digest --iterations 6 --out after.json                   # this checkout
    PYTHONPATH=/tmp/old python learner/tools/digest.py --iterations 6 --out before.json   # another checkout
    cmp before.json after.json

Runs the configured job (default: the embedded one) without Ray for `--iterations` iterations on one
thread (`learner.driver.inprocess.run_inprocess`, rewards scored in-process) and writes every train
statistic but the timings, the windows, and a sha256 of the final trainable weights. Two checkouts with
the same digest train identically on this machine. It also runs against checkouts from before the
learner/ restructuring (it falls back to `learner.loop.run_inprocess` there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

TIMINGS = {"update_s", "update_cpu_s", "forward_backward_s", "optimizer_s", "rollout_timings"}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learner.tools.digest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--config", action="append", default=[], help="preset or YAML file (repeatable)")
    p.add_argument("--out", required=True, help="the digest (JSON)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.async_rollout=true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from reward_servers.client import LocalRewards
    from services.config import ConfigError, load_config

    from . import check_output_file

    try:
        from learner.driver.inprocess import run_inprocess
    except ImportError:  # a checkout from before the restructuring
        from learner.loop import run_inprocess
    try:
        check_output_file(args.out, "--out")
        cfg = load_config(args.config, [f"run.iterations={args.iterations}", *args.overrides])
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats, windows, learner = run_inprocess(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    digest = {"stats": [{k: v for k, v in s.items() if k not in TIMINGS} for s in stats],
              "windows": [list(w) for w in windows],
              "weights_sha256": weights_sha256(learner.policy.trainable_state_dict())}
    with open(args.out, "w") as f:
        json.dump(digest, f, indent=1, sort_keys=True)
    print(f"{args.iterations} iterations: weights {digest['weights_sha256'][:16]}…, reward_mean "
          f"{[round(s['reward_mean'], 6) for s in stats]} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
