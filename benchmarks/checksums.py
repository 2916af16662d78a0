"""The two weight-sync checksums side by side (`services/broadcast.py`): blake2b over the bytes on the host (`b2`)
against the fingerprint taken where the tensors are (`fp`), on LoRA-sized to full-model states.

    python benchmarks/checksums.py                                        # CPU: 10 M and 100 M fp32 parameters
    python benchmarks/checksums.py --device cuda --dtype bf16 --sizes 1e8 2.5e9   # a GPU: b2 includes the copy to the host

A state is 32 tensors of random values; each scheme's time is the median of `--repeats` after one warm-up, the two
alternating. On a GPU `b2` copies every tensor to the host first (what verifying a GPU sync cost before `fp`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish, synchronize  # noqa: E402 (needs the path above)
from services.broadcast import weights_checksum  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(device: torch.device, *args) -> float:
    """Seconds of one `weights_checksum(*args)`."""
    synchronize(device)
    t0 = time.perf_counter()
    weights_checksum(*args)
    synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8], help="parameters per state")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    lines = [f"{args.dtype} states of 32 tensors on {where}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads); median of {args.repeats} after one warm-up, the schemes alternating\n",
             "| parameters | MiB | b2 s | fp s | fp × b2 |", "|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        n = int(size) // 32
        gen = torch.Generator(device=device).manual_seed(0)
        state = {f"t{i:02d}": torch.randn(n, generator=gen, device=device).to(DTYPES[args.dtype]) for i in range(32)}
        times = {"b2": [], "fp": []}
        for r in range(args.repeats + 1):
            for scheme in ("b2", "fp"):
                t = timed(device, state, scheme)
                if r:
                    times[scheme].append(t)
        b2, fp = statistics.median(times["b2"]), statistics.median(times["fp"])
        mib = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
        lines.append(f"| {size:.0e} | {mib:,.0f} | {b2:.3f} | {fp:.3f} | {fp / b2:.2f} |")
        if args.out:  # row by row: a bound that cuts the next size keeps this one
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n(in progress)\n")
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
