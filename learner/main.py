"""MixGRPO-Ray driver: config → cluster → loop → cleanup.

    python learner/main.py                                  # the embedded default (tiny shapes job)
    python learner/main.py --config deploy/configs/mixgrpo_flash.yaml window.size=6
"""

from __future__ import annotations

import argparse
import sys

from services.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="preset name or YAML file (repeatable, merged in order)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. window.size=6")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"config ok: method={cfg.run.method} backend={cfg.model.backend}")
    print("the distributed trainer has not landed yet (issue 5); nothing was trained", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
