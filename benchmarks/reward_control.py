"""Is a held-out gain the reward's doing? The default loop with uniform random rewards, and fresh-set evals.

    python benchmarks/reward_control.py --seed 0 --save /tmp/rand0          # ~6 min, one thread
    python benchmarks/reward_control.py --evaluate base /tmp/rand0/iter_000059 runs/<dir>/checkpoints/iter_000059

Run mode is the default job without Ray (`learner.driver.inprocess.run_inprocess`: the loop's shards, windows, seeds
and weight syncs, and its in-run evaluation), but every configured reward returns U(0, 1) draws (seeded by
`--reward-seed`), so the advantages carry no information and any change of the held-out score is the
optimizer's random walk; `--save DIR` writes the final weights as a checkpoint folder. Evaluate mode scores
"base" or checkpoint folders with `learner.tools.eval` on `--sets` fresh held-out sets (seeds 1…k, 48 prompts
per category each), never the in-run set (seed `run.eval_seed`, 1234), unless `--seeds` names it. The README's
"Results on the embedded default" table was measured so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import publish  # noqa: E402
from learner import evaluation  # noqa: E402
from learner.driver.inprocess import run_inprocess  # noqa: E402
from learner.tools.eval import evaluate_checkpoint  # noqa: E402
from reward_servers.client import LocalRewards  # noqa: E402
from services.config import load_config  # noqa: E402


def random_rewards(names: list[str], seed: int) -> LocalRewards:
    """A sink answering every reward with independent U(0, 1) scores, one per image."""
    rng = np.random.default_rng(seed)
    return LocalRewards({n: (lambda images, prompts: rng.random(len(images))) for n in names})


def run_control(overrides: list[str], reward_seed: int, save: Path | None) -> list[tuple[int, float, float]]:
    """The default loop on random rewards; returns (iterations done, in-run eval score, strict) rows."""
    cfg = load_config(["tiny_cpu"], overrides)
    held = evaluation.run_prompts(cfg)  # the loop's in-run set

    def evaluate(learner, done: int) -> tuple[int, float, float]:
        r = evaluation.evaluate(learner.policy, held, **evaluation.settings(cfg))["overall"]
        print(f"[eval after {done} iterations] in-run held-out score {r['verifier_score']:.3f} "
              f"strict {r['verifier_strict']:.3f}", flush=True)
        return done, r["verifier_score"], r["verifier_strict"]

    rows, t0 = [], time.perf_counter()

    def observe(m: int, learner) -> None:
        done = m + 1
        if done:
            print(f"[iter {done:4d}/{cfg.run.iterations}] {time.perf_counter() - t0:.0f}s", flush=True)
        if done == 0 or done == cfg.run.iterations or (cfg.run.eval_every and done % cfg.run.eval_every == 0):
            rows.append(evaluate(learner, done))

    rewards = random_rewards([r.name for r in cfg.reward.rewards], reward_seed)
    _, _, learner = run_inprocess(cfg, rewards, observe)
    if save:
        print(f"final weights saved to {learner.save(str(save))}")
    return rows


def set_scores(cfg, model: str, seeds: list[int]) -> list[float]:
    """Held-out verifier score of `model` ("base" or a checkpoint folder) on the held-out sets drawn with `seeds`
    (48 prompts per category each, `learner.tools.eval`); seed `run.eval_seed` is the run's in-run set."""
    checkpoint = None if model == "base" else Path(model)
    return [float(evaluate_checkpoint(cfg, checkpoint, seed=s, per_category=48)["overall"]["verifier_score"])
            for s in seeds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="run seed (prompts, noise), as run.seed")
    p.add_argument("--reward-seed", type=int, default=7, help="seed of the random rewards")
    p.add_argument("--save", type=Path, default=None, help="write the final weights here (a checkpoint folder)")
    p.add_argument("--evaluate", nargs="+", default=None, metavar="MODEL",
                   help="instead of training: score base / checkpoint folders on fresh held-out sets")
    p.add_argument("--sets", type=int, default=4, help="fresh held-out sets, seeds 1…k (192 prompts each)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="evaluate on the sets of these seeds instead of 1…k (e.g. 1234 1 2 3 4: the in-run set first)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the result table here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.iterations=20")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        cfg = load_config(["tiny_cpu"], args.overrides)
        seeds = args.seeds or list(range(1, args.sets + 1))
        scores = {m: set_scores(cfg, m, seeds) for m in args.evaluate}
        # ± the standard error of the mean over sets (their sd / √k): the sets are independent draws; one set has no
        # spread to take it from, so it shows its score alone (`learner.tools.eval` gives one set's own ± se)
        def mean_se(sc: list[float]) -> str:
            return (f"{np.mean(sc):.3f} ± {np.std(sc, ddof=1) / np.sqrt(len(sc)):.3f}" if len(sc) > 1
                    else f"{sc[0]:.3f} (one set: no spread over sets)")

        lines = ["| model | " + " / ".join(f"set {s}" for s in seeds) + " | mean ± se |", "|---|---|---|"]
        lines += [f"| {m} | " + " / ".join(f"{v:.3f}" for v in sc) + f" | {mean_se(sc)} |" for m, sc in scores.items()]
        publish("\n".join(lines) + "\n", args.out)
        return 0
    rows = run_control([f"run.seed={args.seed}", *args.overrides], args.reward_seed, args.save)
    lines = ["| iterations | in-run held-out score | strict |", "|---|---|---|"]
    lines += [f"| {n} | {s:.3f} | {st:.3f} |" for n, s, st in rows]
    publish(f"Random-reward control, run seed {args.seed}, reward seed {args.reward_seed}\n\n" + "\n".join(lines) + "\n",
            args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
