"""Where an iteration's time goes: model compute against everything else (Ray, transfer, broadcast, waiting).

    python benchmarks/overhead.py                                  # the default job (MixGRPO, tiny model), 6 iterations
    python benchmarks/overhead.py --layers 8 --head-dim 64         # a larger random-init tiny model, same job
    python benchmarks/overhead.py --config mixgrpo_flash_star      # another method preset
    python benchmarks/overhead.py --from-run runs/shapes-tiny-…    # analyse an existing run's metrics.jsonl

Runs the job through the real driver path (`learner.driver.loop.run_loop` on a local Ray, rewards on Serve) and
splits each synchronous iteration (`iteration_seconds`, from the rollout's launch to the verified broadcast)
with the timings the roles record:

    rollout: model forward   encode + velocity + decode inside the worker (`rollout_timings.{encode,forward,decode}_s`)
    rollout: sampler, other  the rest of sampling: SDE/ODE/DPM step math, noise, chunking (`sample_s` − model)
    reward wait              scores not yet back when sampling ended (`reward_wait_s`; scoring overlaps sampling)
    learner: forward+backward, optimizer step, other (advantages, indexing, statistics)  — parts of `update_s`
    broadcast                weight packet out, every worker loads and verifies it (`broadcast_s`)
    driver / Ray overhead    iteration_seconds − rollout_s − update_s − broadcast_s: task dispatch, moving the
                             rollout batches to the learner, merging them, returning results, the driver itself

Model compute = rollout forward + learner forward/backward + optimizer step. Below the table, each phase's CPU
utilisation (`cpu_utilisation`): the CPU seconds its processes spent ÷ (its wall seconds × the node's cores). Rollout timings are the slowest
worker's (the workers run in parallel); the reward replicas share the same CPUs, so on a small machine the
"model" times include waiting for a core. Async iterations overlap phases and are reported but not split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish  # noqa: E402 (needs the path above)

GOAL_SHARE = 0.90  # the goal: model compute ≥ 90% of iteration time at the default size
PHASES = ("rollout: model forward", "rollout: sampler, other", "reward wait", "learner: forward+backward",
          "learner: optimizer step", "learner: other", "broadcast", "driver / Ray overhead")
MODEL_PHASES = ("rollout: model forward", "learner: forward+backward", "learner: optimizer step")


# ---------------------------------------------------------------------------------- pure helpers
def phase_breakdown(rec: dict) -> dict[str, float]:
    """Seconds per phase of one synchronous train record of metrics.jsonl (see the module docstring).

    Needs the timing fields the worker and learner record (`forward_s`, `forward_backward_s`, …); a record
    written before they existed raises KeyError.
    """
    t, total = rec["rollout_timings"], float(rec["iteration_seconds"])
    model_fwd = t["encode_s"] + t["forward_s"] + t["decode_s"]
    fb, opt, update = rec["forward_backward_s"], rec["optimizer_s"], rec["update_s"]
    return {
        "rollout: model forward": model_fwd,
        "rollout: sampler, other": t["sample_s"] - model_fwd,
        "reward wait": t["reward_wait_s"],
        "learner: forward+backward": fb,
        "learner: optimizer step": opt,
        "learner: other": update - fb - opt,
        "broadcast": rec["broadcast_s"],
        "driver / Ray overhead": total - t["rollout_s"] - update - rec["broadcast_s"],
        "iteration": total,
    }


def median_breakdown(records: list[dict], warmup: int = 1) -> dict[str, float]:
    """Per-phase medians over the train records after `warmup` (all of them if that leaves none).

    Each phase is its own median, so the phases need not add up exactly to the median iteration.
    """
    train = [r for r in records if r.get("kind", "train") == "train"]
    timed = train[warmup:] or train
    parts = [phase_breakdown(r) for r in timed]
    return {k: statistics.median(p[k] for p in parts) for k in (*PHASES, "iteration")}


def compute_share(breakdown: dict[str, float]) -> float:
    """Model compute (rollout forward + learner forward/backward + optimizer step) ÷ iteration seconds."""
    return sum(breakdown[k] for k in MODEL_PHASES) / breakdown["iteration"]


def markdown(breakdown: dict[str, float]) -> str:
    total = breakdown["iteration"]
    lines = ["| phase | median s | share of iteration |", "|---|---:|---:|"]
    for k in PHASES:
        lines.append(f"| {k} | {breakdown[k]:.3f} | {breakdown[k] / total:.1%} |")
    lines.append(f"| **iteration** (median) | {total:.3f} | 100% |")
    share = compute_share(breakdown)
    lines += ["", f"Model compute (forward, forward+backward, optimizer step): {share:.1%} of the iteration "
                  f"(goal ≥ {GOAL_SHARE:.0%}: {'met' if share >= GOAL_SHARE else 'not met'}); everything else "
                  f"{1 - share:.1%}."]
    return "\n".join(lines)


def cpu_utilisation(records: list[dict], cores: int, warmup: int = 1) -> dict[str, float]:
    """Median share of the node's cores each phase kept busy: CPU seconds of the phase's processes (all their
    threads: the workers' `rollout_timings.cpu_s` summed over workers, the learner's `update_cpu_s`) ÷ (the phase's
    wall seconds × `cores`). 1.0: every core busy the whole phase; a one-thread learner on 2 cores reaches 0.5 at
    most. The reward replicas' CPU (separate processes, overlapping the sampling) is not counted. Records without
    the CPU fields (written before them) are skipped; {} when none has them."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    train = [r for r in records if r.get("kind", "train") == "train"]
    timed = [r for r in (train[warmup:] or train) if "update_cpu_s" in r and "cpu_s" in r.get("rollout_timings", {})]
    if not timed:
        return {}
    return {"rollout": statistics.median(r["rollout_timings"]["cpu_s"] / (r["rollout_timings"]["rollout_s"] * cores)
                                         for r in timed),
            "update": statistics.median(r["update_cpu_s"] / (r["update_s"] * cores) for r in timed)}


def utilisation_markdown(util: dict[str, float], cores: int) -> str:
    if not util:
        return "CPU utilisation: the records carry no CPU times (a run from before they were recorded)."
    return "\n".join([f"| phase | CPU utilisation of the {cores} cores (median) |", "|---|---:|",
                      *(f"| {k} | {v:.0%} |" for k, v in util.items())])


# ---------------------------------------------------------------------------------- running
def build_policy(layers: int, head_dim: int, folder: Path) -> tuple[Path, int]:
    """A random-init tiny policy of the given depth/width (timing only: its rewards mean nothing)."""
    from rollout_workers.policies.tiny import TinyConfig, TinyPolicy

    policy = TinyPolicy.from_config(TinyConfig.for_shapes_world(num_layers=layers, attention_head_dim=head_dim), seed=0)
    policy.save(folder)
    return folder, sum(p.numel() for p in policy.trainable_parameters())


def run(args: argparse.Namespace) -> tuple[Path, str]:
    from benchmarks.compare_methods import VARIANTS, common_overrides, run_variants

    label = args.config
    if label not in VARIANTS:
        raise SystemExit(f"--config must be one of {', '.join(VARIANTS)}")
    settings = {"iterations": args.iterations, "batch_size": args.batch_size, "eval_prompts": 16}
    overrides = common_overrides(settings, seed=0)
    size = "the shipped tiny policy (2.29M trainable parameters)"
    tmp = tempfile.TemporaryDirectory(prefix="overhead-policy-")
    if args.layers or args.head_dim:
        path, n = build_policy(args.layers or 4, args.head_dim or 32, Path(tmp.name))
        overrides.append(f"model.path={path}")
        size = (f"a random-init tiny policy, {args.layers or 4} layers × width {4 * (args.head_dim or 32)} "
                f"({n / 1e6:.2f}M trainable parameters)")
    workdir = args.workdir or REPO_ROOT / "runs" / f"bench-overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = run_variants([label], overrides, workdir)
    tmp.cleanup()
    run = runs[label][0]  # one round
    desc = (f"{label}, {size}, {args.batch_size} images per iteration, {args.iterations} iterations (first skipped); "
            f"1-min load average {run['load'][0]:.1f}→{run['load'][1]:.1f}")
    return run["dir"], desc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-run", type=Path, help="analyse this run directory's metrics.jsonl instead of running")
    p.add_argument("--config", default="mixgrpo", help="variant of compare_methods.py (default: mixgrpo)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layers", type=int, help="transformer layers of a random-init policy (default: shipped, 4)")
    p.add_argument("--head-dim", type=int, help="attention head dim of a random-init policy (4 heads; shipped: 32)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="run outputs (default runs/bench-overhead-<timestamp>)")
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    p.add_argument("--cores", type=int, help="cores of the node the run used (default: this machine's)")
    args = p.parse_args(argv)
    from learner.outputs.metrics import MetricsLog

    if args.from_run:
        run_dir, desc = args.from_run, f"run {args.from_run}"
    else:
        run_dir, desc = run(args)
    records = [r for r in MetricsLog(run_dir / "metrics.jsonl").records() if r.get("kind") == "train"]
    if any(r.get("staleness", 0) > 0 for r in records):
        print("note: asynchronous iterations overlap rollout and update; the split below double-counts")
    import os

    cores = args.cores or os.cpu_count() or 1
    util = utilisation_markdown(cpu_utilisation(records, cores, args.warmup), cores)
    text = f"{desc}\n\n{markdown(median_breakdown(records, args.warmup))}\n\n{util}\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
