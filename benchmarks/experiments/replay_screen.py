"""A screened lever for issue 17, kept so its number can be reproduced: self-imitation replay in the default job.

    python benchmarks/experiments/replay_screen.py --replay-weight 0.3 -- --methods default --seeds 1 \
        --iterations 30 --eval-every 30 --sets 2 --per-category 48 --threads 1 learner.num_threads=1 rollout.num_threads=1

Every image the rule verifier scores perfect (`shapes_verifier` ≥ --replay-threshold) joins a FIFO buffer of
(final latent, prompt states) of --replay-capacity; each learner micro-batch adds --replay-weight × the plain
flow-matching error of --replay-rows buffered images at times drawn from the rollout's σ grid (a RAFT-style
"learn from your best samples", replayed across iterations so that a rare success, such as a square the verifier
accepts, is trained on more than once). Everything after `--` goes to `benchmarks/sample_efficiency.py`.

It is an experiment, not a config field: it patches `Learner.update` and `Learner._micro_step` in this process
only. Measured on seed 1 (results/alignment_experiments.md, "What each lever did"), it lowered the fresh-set gain at every weight tried, so it
was not built into the learner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from learner.algo.family import flow_matching_error, noised  # noqa: E402
from learner.training import updates  # noqa: E402


def replay_generator(seed: int, key: tuple[int, int, int]) -> torch.Generator:
    """The draws of micro-batch `key` = (iteration, epoch, micro-batch): which buffered images, their times, ε."""
    return torch.Generator().manual_seed(1000003 * seed + 7919 * key[0] + 31 * key[1] + key[2] + 17)


def install(weight: float, capacity: int, rows: int, threshold: float, reward: str = "shapes_verifier") -> dict:
    """Patch the Learner class in this process; -> the buffer's state, with "restore" to undo the patch."""
    learner_cls = updates.Learner
    plain_update, plain_micro = learner_cls.update, learner_cls._micro_step
    state: dict = {"buffer": [], "added": 0}

    def restore() -> None:
        learner_cls.update, learner_cls._micro_step = plain_update, plain_micro

    def update(self, batch, between=None):
        if self.aux is None or batch.final_latents is None:  # the times come from the matching term's σ grid
            raise ValueError("replay needs the matching term (grpo.matching_aux > 0, as the default job has): it "
                             "keeps the final latents and the σ grid the replayed times are drawn from")
        if reward not in batch.rewards:
            raise ValueError(f"replay picks images by the {reward!r} reward; this run's rewards: {sorted(batch.rewards)}")
        scores, g = batch.rewards[reward].flatten(), batch.group_size
        perfect = torch.nonzero(scores >= threshold).flatten().tolist()
        for i in perfect:  # the row's final latent and its prompt's states (cond is per prompt)
            state["buffer"].append((batch.final_latents[i].float().clone(),
                                    {k: v[i // g].clone() for k, v in batch.cond.items()}))
        state["added"] += len(perfect)
        del state["buffer"][:-capacity]
        out = plain_update(self, batch, between)
        print(f"    replay: +{len(perfect)} perfect images, buffer {len(state['buffer'])}", flush=True)
        return out

    def micro_step(self, batch, cond, micro_rows, steps, adv, key=(), weights=None):
        loss, m = plain_micro(self, batch, cond, micro_rows, steps, adv, key, weights)
        buffer = state["buffer"]
        if weight > 0 and buffer:
            gen = replay_generator(self.seed, key)
            pick = torch.randint(len(buffer), (min(rows, len(buffer)),), generator=gen).tolist()
            x0 = torch.stack([buffer[i][0] for i in pick])
            c = {k: torch.stack([buffer[i][1][k] for i in pick]) for k in buffer[0][1]}
            grid = self.aux.grid()  # the default's matching term: the rollout's σ grid
            t = grid[torch.randint(len(grid), (len(pick),), generator=gen)]
            eps = torch.randn(x0.shape, generator=gen)
            v = self.policy.velocity(noised(x0, eps, t), t, c).float()
            loss = loss + weight * flow_matching_error(v, x0, eps).mean()
            m["forward_rows"] += len(pick)
        return loss, m

    learner_cls.update, learner_cls._micro_step = update, micro_step
    state["restore"] = restore
    return state


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replay-weight", type=float, default=0.3)
    p.add_argument("--replay-capacity", type=int, default=256)
    p.add_argument("--replay-rows", type=int, default=8, help="buffered images per micro-batch")
    p.add_argument("--replay-threshold", type=float, default=0.999, help="verifier score that counts as perfect")
    args = p.parse_args(ours)
    install(args.replay_weight, args.replay_capacity, args.replay_rows, args.replay_threshold)
    from benchmarks.sample_efficiency import main as sample_efficiency

    return sample_efficiency(rest)


if __name__ == "__main__":
    raise SystemExit(main())
