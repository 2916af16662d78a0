"""Can the default job improve the prompts it trains on? Issue 17's over-fitting check.

    python benchmarks/experiments/fixed_prompts_screen.py --per-category 4 --iterations 60 --eval-every 10 --seed 1
    python benchmarks/experiments/fixed_prompts_screen.py --per-category 1 --prompts 2 --repeats 16 --iterations 30 \
        --sets 0 'reward.rewards=[{name: shapes_verifier, weight: 1.0}]'     # two prompts, each 32 images/iteration

The default job (`tiny_cpu`, in-process, one thread) trains on a fixed set of train-split prompts only
(`--per-category` per category, drawn with seed --prompt-seed, written to a prompts file and used through
`rollout.prompts=file`), so each prompt is drawn many times: at 16 prompts and 8 per iteration, 30 times in 60
iterations, 240 images. Every `--eval-every` iterations the learner's weights are scored by the rule verifier (the
evaluation's ODE) on
- the trained prompts from their set's own noise (seed --prompt-seed),
- the same prompts from --noise-seeds other noises (their mean): what the policy learned about the prompts and
  not about one draw of them,
- the fresh held-out sets 101… (`--sets`, 48 prompts per category), as `benchmarks/sample_efficiency.py` does;
- and, after the run, the training rollouts' mean reward per interval (the learner's per-iteration means), what the
  update climbs.
`--prompts N` keeps the first N of the draw (single, counting, … in category order); `--repeats R` scores every
trained prompt R times per noise seed, each copy its own noise (a few prompts need more than one image each).

If RL sharpened the policy toward what each prompt asks, the trained prompts would rise the most. Measured (README,
"The base reads colour words only"): they do not. Everything after the script's own flags goes to the config as
dotted overrides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FRESH_SET0 = 101


def run(per_category: int, iterations: int, eval_every: int, seed: int, *, prompt_seed: int = 7,
        noise_seeds: tuple[int, ...] = (7001, 7002, 7003, 7004), sets: int = 2, fresh_per_category: int = 48,
        num_prompts: int | None = None, repeats: int = 1, overrides: tuple[str, ...] = (),
        workdir: str | None = None, log=print) -> dict:
    """-> {"prompts", "curve": [{"iterations", "own_noise", "other_noise", "fresh", "train_reward"}], "reward_means":
    the learner's per-iteration mean of each reward}, scored at
    iteration 0, every `eval_every` and at the end (fresh: None without sets; train_reward: the interval's mean
    training reward per reward name, {} before training)."""
    from learner import evaluation
    from learner.driver.inprocess import run_inprocess
    from learner.evaluation.prompts import heldout_prompts, shapes_prompts
    from reward_servers.client import LocalRewards
    from services.config import load_config

    if repeats < 1 or (num_prompts is not None and num_prompts < 1):
        raise ValueError(f"repeats and num_prompts must be >= 1, got {repeats}, {num_prompts}")
    prompts = shapes_prompts("train", per_category, prompt_seed)[:num_prompts]
    scored = [p for p in prompts for _ in range(repeats)]
    folder = Path(workdir or tempfile.mkdtemp(prefix="fixed_prompts_"))
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    cfg = load_config(["tiny_cpu"], [f"run.seed={seed}", f"run.iterations={iterations}", "run.eval_every=0",
                                     "rollout.prompts=file", f"rollout.prompts_file={path}",
                                     "learner.num_threads=1", "rollout.num_threads=1", *overrides])
    fresh = [(s, heldout_prompts(fresh_per_category, s)) for s in range(FRESH_SET0, FRESH_SET0 + sets)]

    def score(policy, ps: list[str], s: int) -> float:
        return evaluation.evaluate(policy, ps, num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift, seed=s,
                                   verifier=True)["overall"]["verifier_score"]

    curve, t0 = [], time.perf_counter()

    def observe(m: int, learner) -> None:
        done = m + 1
        if done in (0, iterations) or done % eval_every == 0:
            row = {"iterations": done, "own_noise": score(learner.policy, scored, prompt_seed),
                   "other_noise": statistics.mean(score(learner.policy, scored, s) for s in noise_seeds),
                   "fresh": statistics.mean(score(learner.policy, ps, s) for s, ps in fresh) if fresh else None}
            curve.append(row)
            fresh_text = f"; fresh sets {row['fresh']:.3f}" if fresh else ""
            log(f"{done} iterations: trained prompts {row['own_noise']:.3f} (their noise), {row['other_noise']:.3f} "
                f"({len(noise_seeds)} other noises){fresh_text}  ({time.perf_counter() - t0:.0f} s)")

    stats, _, _ = run_inprocess(cfg, LocalRewards.from_specs(cfg.reward.rewards), observe)
    reward_means = [{k[len("reward_mean/"):]: v for k, v in st.items() if k.startswith("reward_mean/")}
                    for st in stats]
    for before, row in zip([0, *(r["iterations"] for r in curve)], curve, strict=False):
        its = reward_means[before:row["iterations"]]  # the iterations since the last scoring
        row["train_reward"] = {n: statistics.mean(m[n] for m in its) for n in (its[0] if its else {})}
        if its:
            log(f"iterations {before + 1}-{row['iterations']}: training rollouts "
                + ", ".join(f"{n} {v:.3f}" for n, v in row["train_reward"].items()))
    return {"prompts": prompts, "curve": curve, "reward_means": reward_means}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-category", type=int, default=4, help="trained prompts per category")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1, help="the run seed")
    p.add_argument("--prompt-seed", type=int, default=7, help="the trained prompts' draw and their own noise")
    p.add_argument("--noise-seeds", type=int, nargs="+", default=[7001, 7002, 7003, 7004])
    p.add_argument("--sets", type=int, default=2, help="fresh held-out sets (seeds 101, 102, …; 0: none)")
    p.add_argument("--prompts", type=int, default=None, help="train on the first N of the drawn prompts only")
    p.add_argument("--repeats", type=int, default=1, help="score each trained prompt R times per noise seed")
    p.add_argument("--fresh-per-category", type=int, default=48)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. learner.lr=1e-4")
    args = p.parse_args(argv)
    if args.eval_every < 1 or args.iterations < 1:
        p.error("--iterations and --eval-every must be >= 1")
    torch.set_num_threads(1)
    result = run(args.per_category, args.iterations, args.eval_every, args.seed, prompt_seed=args.prompt_seed,
                 noise_seeds=tuple(args.noise_seeds), sets=args.sets, fresh_per_category=args.fresh_per_category,
                 num_prompts=args.prompts, repeats=args.repeats,
                 overrides=tuple(args.overrides))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
