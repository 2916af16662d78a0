"""Write a run's report (<run>/report.md and its plots) from its metrics.jsonl and sample grids.

    python -m learner.tools.report runs/shapes-tiny-20261122-101500      # also written when a run ends
"""

from __future__ import annotations

import argparse
import sys

from learner.outputs.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learner.tools.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        print(write_report(args.run_dir))
    except (FileNotFoundError, ValueError) as e:  # not a run directory; a damaged metrics.jsonl
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
