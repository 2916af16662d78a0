"""Which method aligns fastest on the shapes world? Every method under one budget, scored on fresh held-out sets.

    python benchmarks/sample_efficiency.py                                   # all methods, 3 seeds, 20 iterations
    python benchmarks/sample_efficiency.py --methods mixgrpo awm --seeds 1 --iterations 4 --per-category 8

Each (method, seed) runs the default tiny job with that method's preset (`learner.driver.inprocess.run_inprocess`:
the loop without Ray, one thread, the same shards, windows, seeds and weight syncs) on one budget of images:
`--iterations` × the default `rollout.batch_size` scored images, the same prompts (run seed) and reward (the default
job's). A preset that scores more images per iteration (TempFlow-GRPO's children, G²RPO's children at each
granularity) runs proportionally fewer iterations. "control" is MixGRPO on uniform random rewards (`benchmarks/reward_control.py`): whatever it gains is
the optimizer's random walk, the floor under every other row.

Along the way (every `--eval-every` iterations and at the end) the learner's current weights are scored by the rule
verifier on `--sets` fresh held-out sets (seeds 101…, `--per-category` balanced prompts each), never the in-run
set (seed 1234) and never a training prompt. Wall-clock is the training time only (the scoring is excluded).

The table: held-out score of the base and after the budget, the gain (mean ± sample sd over seeds), the gain per
1,000 images and per minute of training; the plot: held-out score against images consumed (mean over seeds, the
band ± sd), written beside the table (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish  # noqa: E402
from benchmarks.reward_control import random_rewards  # noqa: E402

METHODS = {  # row label → (preset, random rewards?)
    "mixgrpo": ("mixgrpo", False),
    "mixgrpo_flash": ("mixgrpo_flash", False),
    "dance_grpo": ("dance_grpo", False),
    "flow_grpo": ("flow_grpo", False),
    "flow_grpo_fast": ("flow_grpo_fast", False),
    "tempflow_grpo": ("tempflow_grpo", False),
    "g2rpo": ("g2rpo", False),
    "awm": ("awm", False),
    "diffusion_nft": ("diffusion_nft", False),
    "control": ("mixgrpo", True),
    "default": ("tiny_cpu", False),  # the embedded default: MixGRPO + AWM's matching term (grpo.matching_aux)
    "default_control": ("tiny_cpu", True),
}
DEFAULT_METHODS = ["mixgrpo", "mixgrpo_flash", "dance_grpo", "awm", "diffusion_nft", "control"]
SET_SEED0 = 101  # fresh sets: 101, 102, …; the in-run set is 1234, the prompts of training come from the run seed


def images_per_iteration(cfg) -> int:
    """Images a run of `cfg` scores per iteration: its rows, times the finishing grids under G²RPO."""
    grids = len(cfg.sampler.granularities) if cfg.sampler.branching == "granular" else 1
    return cfg.rollout.batch_size * grids


def gain_rows(curves: dict[str, dict[int, list[tuple[int, float, float, int]]]]) -> list[dict]:
    """curves: method → seed → [(iterations done, held-out score, training seconds so far, images so far)],
    iteration 0 first.

    -> one row per method: base and final scores (means over seeds), gain mean and sample sd over seeds, gain per
    1,000 images and per training minute (from the means)."""
    rows = []
    for method, by_seed in curves.items():
        gains = [c[-1][1] - c[0][1] for c in by_seed.values()]
        images = statistics.mean(c[-1][3] for c in by_seed.values())
        minutes = statistics.mean(c[-1][2] for c in by_seed.values()) / 60
        gain = statistics.mean(gains)
        rows.append({"method": method, "seeds": len(gains), "base": statistics.mean(c[0][1] for c in by_seed.values()),
                     "final": statistics.mean(c[-1][1] for c in by_seed.values()), "gain": gain,
                     "gain_sd": statistics.stdev(gains) if len(gains) > 1 else float("nan"), "gains": gains,
                     "images": images, "minutes": minutes,
                     "per_1000_images": 1000 * gain / images if images else float("nan"),
                     "per_minute": gain / minutes if minutes else float("nan")})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | seeds | held-out base → after | gain (mean ± sd) | per-seed gains | images | train min | "
             "gain / 1,000 images | gain / min |", "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seeds']} | {r['base']:.3f} → {r['final']:.3f} | {r['gain']:+.3f} ± "
                     f"{r['gain_sd']:.3f} | {' / '.join(f'{g:+.3f}' for g in r['gains'])} | {r['images']:.0f} | "
                     f"{r['minutes']:.1f} | {r['per_1000_images']:+.4f} | {r['per_minute']:+.4f} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_seed in curves.items():
        points = sorted({im for c in by_seed.values() for _, _, _, im in c})
        per_point = [[s for c in by_seed.values() for _, s, _, im in c if im == p] for p in points]
        mean = [statistics.mean(v) for v in per_point]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_point]
        x = points
        ax.plot(x, mean, marker="o", label=method, linestyle="--" if method == "control" else "-")
        ax.fill_between(x, [m - s for m, s in zip(mean, sd, strict=True)],
                        [m + s for m, s in zip(mean, sd, strict=True)], alpha=0.15)
    ax.set_xlabel("images consumed (rollout samples)")
    ax.set_ylabel("held-out verifier score (fresh sets)")
    ax.set_title("Sample efficiency on the shapes world (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_one(preset: str, random: bool, seed: int, args, overrides: list[str], budget: int
            ) -> list[tuple[int, float, float, int]]:
    from learner import evaluation
    from learner.driver.inprocess import run_inprocess
    from learner.tools.eval import eval_prompt_list
    from reward_servers.client import LocalRewards
    from services.config import load_config

    per_iter = images_per_iteration(load_config([preset], overrides))
    iterations = max(1, round(budget / per_iter))
    every = budget * args.eval_every / args.iterations  # images between scorings
    cfg = load_config([preset], [f"run.seed={seed}", f"run.iterations={iterations}", "run.eval_every=0", *overrides])
    first = args.first_set
    sets = [(s, eval_prompt_list(cfg, None, args.per_category, s)) for s in range(first, first + args.sets)]
    names = [r.name for r in cfg.reward.rewards]
    rewards = random_rewards(names, 7 + seed) if random else LocalRewards.from_specs(cfg.reward.rewards)
    curve, clock = [], {"train": 0.0, "mark": time.perf_counter()}

    def observe(m: int, learner) -> None:
        done = m + 1
        clock["train"] += (time.perf_counter() - clock["mark"]) if done else 0.0  # not the set-up before iteration 0
        if done == 0 or done == iterations or int(done * per_iter / every) > int((done - 1) * per_iter / every):
            scores = [evaluation.evaluate(learner.policy, prompts, num_steps=cfg.sampler.num_steps,
                                          shift=cfg.sampler.shift, seed=s, verifier=True)["overall"]["verifier_score"]
                      for s, prompts in sets]
            curve.append((done, float(statistics.mean(scores)), clock["train"], done * per_iter))
            print(f"  {preset}{' (random rewards)' if random else ''} seed {seed}: {done} iterations, held-out "
                  f"{curve[-1][1]:.3f}, {clock['train']:.0f} s training", flush=True)
        clock["mark"] = time.perf_counter()

    run_inprocess(cfg, rewards, observe)
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iterations", type=int, default=20,
                   help="the budget: this many iterations of the default rollout.batch_size images")
    p.add_argument("--eval-every", type=int, default=5, help="score every this many budget iterations' images")
    p.add_argument("--sets", type=int, default=2, help="fresh held-out sets (seeds 101, 102, …)")
    p.add_argument("--first-set", type=int, default=SET_SEED0,
                   help="seed of the first set: sets not used to choose settings (e.g. 201) for a final table")
    p.add_argument("--per-category", type=int, default=24, help="prompts per category in each set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "sample_efficiency.md")
    p.add_argument("--plot", type=Path, default=None, help="default: beside --out, with the suffix .png")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. rollout.batch_size=32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from services.config import load_config

    base = load_config([], args.overrides)
    eval_seed, batch = base.run.eval_seed, base.rollout.batch_size
    if args.first_set <= eval_seed < args.first_set + args.sets:
        p.error(f"--first-set {args.first_set} --sets {args.sets} includes the in-run set (seed {eval_seed})")
    curves, t0 = {}, time.perf_counter()
    for method in args.methods:
        preset, random = METHODS[method]
        curves[method] = {s: run_one(preset, random, s, args, args.overrides, args.iterations * batch)
                          for s in args.seeds}
    rows = gain_rows(curves)
    args.plot = args.plot or args.out.with_suffix(".png")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, args.plot)
    import os

    head = (f"A budget of {args.iterations} × {batch} images per method and seed (seeds {args.seeds}); held-out: "
            f"{args.sets} fresh sets × {4 * args.per_category} prompts (seeds {args.first_set}…), scored every "
            f"{args.eval_every} iterations; {args.threads} torch thread(s); {os.cpu_count()} CPU cores, 1-min load "
            f"average at the end {os.getloadavg()[0]:.1f}; {(time.perf_counter() - t0) / 60:.0f} min in all.\n\n")
    publish(head + markdown(rows) + f"\n\nPlot: `{args.plot.name}`.\n", args.out)
    (args.out.with_suffix(".json")).write_text(json.dumps({m: {str(s): c for s, c in v.items()}
                                                            for m, v in curves.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
