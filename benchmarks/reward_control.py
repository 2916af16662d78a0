"""Is a held-out gain the reward's doing? The default loop with uniform random rewards, and fresh-set evals.

    python benchmarks/reward_control.py --seed 0 --save /tmp/rand0.pt          # ~6 min, one thread
    python benchmarks/reward_control.py --evaluate base /tmp/rand0.pt runs/<dir>/checkpoints/iter_000059

Run mode replays the default job in-process (no Ray): the same learner, rollout worker, window scheduler,
prompt stream and in-run evaluation as `learner/main.py`, but every configured reward returns
U(0, 1) draws (seeded by `--reward-seed`), so the advantages carry no information and any change of the
held-out score is the optimizer's random walk. Evaluate mode scores models on `--sets` fresh held-out sets
(`learner.eval`'s prompts and noise for seeds 1…k, 48 prompts per category each), never the in-run set:
"base", a transformer state dict saved by `--save`, or a run checkpoint folder. The README's "Results on
the embedded default" table was measured this way.
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
from learner.actors import build_learner, build_worker, window_spec  # noqa: E402
from reward_servers.client import LocalRewards  # noqa: E402
from services.config import load_config  # noqa: E402
from services.prompts import PromptSource, heldout_prompts  # noqa: E402
from services.scheduler import WindowScheduler  # noqa: E402


def random_rewards(names: list[str], seed: int) -> LocalRewards:
    """A sink answering every reward with independent U(0, 1) scores, one per image."""
    rng = np.random.default_rng(seed)
    return LocalRewards({n: (lambda images, prompts: rng.random(len(images))) for n in names})


def run_control(overrides: list[str], reward_seed: int, save: Path | None) -> list[tuple[int, float, float]]:
    """The default loop on random rewards; returns (iterations done, in-run eval score, strict) rows."""
    cfg = load_config([], overrides)
    learner = build_learner(cfg)
    worker = build_worker(cfg, random_rewards([r.name for r in cfg.reward.rewards], reward_seed), 0)
    worker.sync_weights(learner.get_weights())
    scheduler = WindowScheduler(window_spec(cfg))
    source = PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file, shapes_grammar=True)
    held = heldout_prompts(cfg.run.eval_prompts)  # the loop's in-run set

    def evaluate(done: int) -> tuple[int, float, float]:
        r = learner.evaluate(held, num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift, seed=cfg.run.eval_seed)
        print(f"[eval after {done} iterations] in-run held-out score {r['score']:.3f} strict {r['strict']:.3f}",
              flush=True)
        return done, float(r["score"]), float(r["strict"])

    rows, t0 = [evaluate(0)], time.perf_counter()
    for m in range(cfg.run.iterations):
        win = scheduler.advance(m)
        batch = worker.rollout(m, (win.start, win.size), source.for_iteration(m, cfg.num_groups),
                               list(range(cfg.num_groups)))
        learner.update(batch)
        worker.sync_weights(learner.get_weights())
        print(f"[iter {m + 1:4d}/{cfg.run.iterations}] window=[{win.start},{win.start + win.size}) "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        if cfg.run.eval_every and (m + 1) % cfg.run.eval_every == 0 and m + 1 < cfg.run.iterations:
            rows.append(evaluate(m + 1))
    rows.append(evaluate(cfg.run.iterations))
    if save:
        torch.save({k: v.detach().clone() for k, v in learner.policy.transformer.state_dict().items()}, save)
        print(f"transformer weights saved to {save}")
    return rows


def fresh_set_scores(model: str, sets: int, num_steps: int, shift: float) -> list[float]:
    """Held-out verifier score of `model` ("base", a saved state dict, or a checkpoint folder) on sets 1…k."""
    from learner.evaluate_base import eval_prompts
    from learner.pretrain import evaluate_policy
    from rollout_workers.policies.tiny import TinyPolicy

    if Path(model).is_dir():
        from learner.eval import load_models

        policy, _ = load_models(load_config([], []), Path(model), need_base=False)
    else:
        policy = TinyPolicy.load(Path(__file__).resolve().parents[1] / "rollout_workers/assets/tiny_policy")
        if model != "base":
            policy.transformer.load_state_dict(torch.load(model))
    return [float(evaluate_policy(policy, eval_prompts("heldout", 48, s), num_steps=num_steps, shift=shift,
                                  seed=s, batch_size=64)["score"]) for s in range(1, sets + 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="run seed (prompts, noise), as run.seed")
    p.add_argument("--reward-seed", type=int, default=7, help="seed of the random rewards")
    p.add_argument("--save", type=Path, default=None, help="write the final transformer state dict here")
    p.add_argument("--evaluate", nargs="+", default=None, metavar="MODEL",
                   help="instead of training: score base / state-dict files / checkpoint folders on fresh sets")
    p.add_argument("--sets", type=int, default=4, help="fresh held-out sets (192 prompts each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the result table here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.iterations=20")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        cfg = load_config([], args.overrides)
        scores = {m: fresh_set_scores(m, args.sets, cfg.sampler.num_steps, cfg.sampler.shift) for m in args.evaluate}
        lines = ["| model | " + " / ".join(f"set {s}" for s in range(1, args.sets + 1)) + " | mean |", "|---|---|---|"]
        lines += [f"| {m} | " + " / ".join(f"{v:.3f}" for v in sc) + f" | {np.mean(sc):.3f} |" for m, sc in scores.items()]
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
