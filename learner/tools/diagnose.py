"""Is a reward learnable at this batch size? The signal-to-noise ratio of the GRPO policy gradient.

    python -m learner.tools.diagnose                 # the default tiny job, its rewards
    python -m learner.tools.diagnose --batches 6 --window-start 0 4 8 rollout.batch_size=128
    python -m learner.tools.diagnose --shapes --window-start 0 4 8   # can the rollouts draw each shape at all?
    python -m learner.tools.diagnose --recovery 0 4 8 10 12 14       # at which step is a shape decided?
    python -m learner.tools.diagnose --best-of 16 --sets 101 102     # the policy's best of k draws per prompt
    python -m learner.tools.diagnose --words 96                      # does the policy follow each kind of word?

Draws `--batches` independent rollout batches at the same weights (same prompts, fresh noise), takes the
policy gradient of each (the GRPO loss at ratio 1, every window step) and reports the mean pairwise
cosine c between them, per reward. For an estimate g = s + n with zero-mean noise,
E[cos(g_i, g_j)] = |s|² / (|s|² + E|n|²) = SNR² / (1 + SNR²), so SNR² = c / (1 − c) per batch.
Averaging T batch gradients (to first order what T small optimizer steps do) multiplies SNR² by T, so a
cumulative SNR of k needs about k²(1 − c)/c iterations. Measured on the default job (64 images, window
4 of 16 steps), on the shipped base: the rule verifier c = 0.31 ± 0.08 and the learned reward 0.40 at window
start 0, both ≈ 0 (± 0.06–0.09) from start 8, where shapes are decided (`--batches 6 --window-start 0 4 8 11`;
benchmarks/results/alignment_experiments.md, "Why the gain stops near +0.05"). A clearly positive c means a
reward is learnable at this batch size; for c near 0 compare a run with a random-reward control on fresh
evaluation sets (README, "Results on the embedded default").

`--shapes` (tiny): how often the training rollouts (the SDE window, groups of `grpo.group_size`) draw the shape a
single-object prompt asks for, in the asked colour; a group without it has no advantage pointing toward it. On the
first base: squares in 2 of 144 images, triangles 52 of 144, circles 78 of 120; on the refiner base (shipped since 4
December, `--window-start 0 4 8`) 55, 90 and 96. `--recovery STEP …`: rendered single-object images noised to σ_STEP
and finished by the policy's ODE; on the first base squares are kept from step 12 (σ 0.50) and 10, hardly earlier.

`--best-of K`: each held-out prompt of `--sets` drawn K times by the evaluation's ODE (draw 0 from the set's own
noise, so best of 1 is the evaluation's score; draw j from seed 10000·set + j), and the macro-averaged mean of the
best of the first k draws. On the first base, sets 101–102: 0.457, 0.569, 0.680, 0.763, 0.820 for k = 1 … 16.

`--words PAIRS` asks whether the policy reads each kind of word at all (`learner.tools.words`). On the first
base, 96 pairs each: colour +0.90, shape +0.06, count +0.11, relation +0.02 (README, "The base reads colour words
only").

Runs in-process (no Ray); rewards are scored by the same scorers the Serve deployments wrap.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from learner.tools.words import markdown as words_markdown
from learner.tools.words import word_sensitivity

RewardFn = Callable[[np.ndarray, list[str]], np.ndarray]


def pairwise_cosine(grads: Sequence[torch.Tensor]) -> np.ndarray:
    """Cosine similarity of every pair (i < j) of flattened gradients; NaN for a zero gradient."""
    if len(grads) < 2:
        raise ValueError(f"need at least two gradients, got {len(grads)}")
    out = []
    for a, b in itertools.combinations(grads, 2):
        na, nb = float(a.norm()), float(b.norm())
        out.append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan"))
    return np.asarray(out)


def snr_squared(cosine: float) -> float:
    """Per-batch SNR² from the mean pairwise cosine c: c / (1 − c) (0 for c ≤ 0)."""
    c = float(cosine)
    return max(c, 0.0) / (1.0 - c) if c < 1.0 else float("inf")


def iterations_for_snr(cosine: float, k: float = 3.0) -> float:
    """Batches whose averaged gradient reaches SNR k: k² / SNR² (inf when there is no signal)."""
    s2 = snr_squared(cosine)
    return k * k / s2 if s2 > 0 else float("inf")


def check_window_start(cfg, start: int, size: int) -> None:
    """A window of `size` SDE steps may start at 0 … N − 1 − size (the last step is never trained)."""
    last = cfg.sampler.num_steps - 1 - size
    if not 0 <= start <= last:
        raise ValueError(f"window start {start} is outside 0..{last}")


def gradient_snr(cfg, rewards: Mapping[str, RewardFn], *, num_batches: int = 4,
                 window_starts: Sequence[int] = (0,), iteration: int = 0) -> list[dict]:
    """Mean pairwise gradient cosine per (window start, reward) on the config's policy and batch shape.

    The prompts are those of `iteration`; batch b uses the noise of iteration `iteration + 1000·(b+1)`.
    Returns rows {"window_start", "reward", "cosine", "cosine_std", "snr2", "iterations_for_snr3",
    "reward_mean", "reward_std_in_group"}.
    """
    from learner.driver.build import build_learner, build_worker
    from reward_servers.client import LocalRewards
    from services.prompts import PromptSource

    if num_batches < 2:
        raise ValueError(f"num_batches must be >= 2, got {num_batches}")
    names = list(rewards)
    learner = build_learner(cfg)
    learner.reward_weights = {}
    worker = build_worker(cfg, LocalRewards(rewards), 0)
    worker.reward_names = names
    worker.sync_weights(learner.get_weights())
    prompts = PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file,
                           shapes_grammar=cfg.model.backend == "tiny").for_iteration(iteration, cfg.num_groups)
    size = min(cfg.window.size, cfg.sampler.num_steps)
    rows = []
    for start in window_starts:
        check_window_start(cfg, start, size)
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        stats: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for b in range(num_batches):
            batch = worker.rollout(iteration + 1000 * (b + 1), (start, size), prompts, list(range(len(prompts))))
            for n in names:
                r = batch.rewards[n]
                stats[n].append((float(r.mean()), float(r.view(len(prompts), -1).std(1).mean())))
                single = dataclasses.replace(batch, rewards={n: r})
                learner.reward_weights = {n: 1.0}
                grads[n].append(learner.policy_gradient(single))
        for n in names:
            cos = pairwise_cosine(grads[n])
            c = float(np.nanmean(cos)) if np.isfinite(cos).any() else float("nan")
            rows.append({"window_start": start, "reward": n, "cosine": c, "cosine_std": float(np.nanstd(cos)),
                         "snr2": snr_squared(c), "iterations_for_snr3": iterations_for_snr(c),
                         "reward_mean": float(np.mean([m for m, _ in stats[n]])),
                         "reward_std_in_group": float(np.mean([s for _, s in stats[n]]))})
    return rows


def shape_tally(prompts: Sequence[str], images: np.ndarray, groups: Sequence[object]) -> dict[str, dict[str, int]]:
    """Single-object prompts' images with their groups' keys (one key per group) → per shape asked: "images",
    "hits" (images holding an object of that shape in the asked colour, as the verifier detects it), "groups",
    "groups_hit" (groups with at least one hit). Other prompts are skipped."""
    from services import shapes_world

    out = {s: {"images": 0, "hits": 0, "groups": 0, "groups_hit": 0} for s in shapes_world.SHAPES}
    seen: dict[object, bool] = {}
    for prompt, image, group in zip(prompts, images, groups, strict=True):
        spec = shapes_world.parse(prompt)
        if spec.category != "single":
            continue
        colour, shape, _ = spec.objects[0]
        hit = any((d.color, d.shape) == (colour, shape) for d in shapes_world.detect(image))
        out[shape]["images"] += 1
        out[shape]["hits"] += hit
        if group not in seen:
            out[shape]["groups"] += 1
            seen[group] = False
        if hit and not seen[group]:
            out[shape]["groups_hit"] += 1
            seen[group] = True
    return out


def rollout_shape_hits(cfg, window_starts: Sequence[int] = (0,), iteration: int = 0) -> dict[str, dict[str, int]]:
    """`shape_tally` of the training rollouts at the config's starting weights: every train-split single-object
    prompt, one group each per window start (tiny backend)."""
    from learner.driver.build import build_learner, build_worker
    from reward_servers.client import LocalRewards
    from services import shapes_world

    if cfg.model.backend != "tiny":
        raise ValueError(f"--shapes needs the tiny backend's shapes world, not {cfg.model.backend!r}")
    size = min(cfg.window.size, cfg.sampler.num_steps)
    seen: list[tuple[str, np.ndarray]] = []

    def record(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        seen.extend(zip(prompts, images))
        return np.zeros(len(images), np.float32)

    names = [r.name for r in cfg.reward.rewards]
    worker = build_worker(cfg, LocalRewards({n: record if i == 0 else (lambda ims, ps: np.zeros(len(ims)))
                                             for i, n in enumerate(names)}), 0)
    worker.sync_weights(build_learner(cfg).get_weights())
    prompts = shapes_world.all_prompts("train", ("single",))
    keys: list[object] = []
    for start in window_starts:
        check_window_start(cfg, start, size)
        before = len(seen)
        for lo in range(0, len(prompts), cfg.num_groups):
            chunk = prompts[lo:lo + cfg.num_groups]
            worker.rollout(iteration, (start, size), chunk, list(range(lo, lo + len(chunk))))
        keys += [(start, p) for p, _ in seen[before:]]  # a group: one prompt's images at one window start
    return shape_tally([p for p, _ in seen], np.stack([im for _, im in seen]), keys)


def recover(velocity_fn, x0: torch.Tensor, noise: torch.Tensor, cond, sigmas: torch.Tensor,
            step: int) -> torch.Tensor:
    """Noise x0 (B, C, H, W) to σ_step, x = (1 − σ)·x0 + σ·ε, and integrate the ODE from step `step` to the
    end of `sigmas` (N+1,) -> (B, C, H, W): what the model makes of a clean image's noisy version at
    σ_step."""
    from learner.algo.sampler import sample_ode

    s = float(sigmas[step])
    return sample_ode(velocity_fn, (1.0 - s) * x0 + s * noise, cond, sigmas[step:])


def shape_recovery(cfg, steps: Sequence[int], per_prompt: int = 4, seed: int = 0) -> list[dict]:
    """Where along the trajectory does the policy decide a shape? Every train-split single-object prompt is
    rendered `per_prompt` times, noised to σ_k of the run's schedule for each k in `steps`, and finished by
    the ODE (`recover`): the rows {"step", "sigma", shape: {"images", "hits", ...}} (`shape_tally`). A shape
    kept from σ_k but lost from earlier steps is decided between them; k = 0 is plain sampling (pure noise).
    """
    from learner.algo.schedule import sigma_schedule
    from learner.driver.build import policy_from_config
    from learner.tools.pretrain import render_batch
    from services import shapes_world

    if cfg.model.backend != "tiny":
        raise ValueError(f"--recovery needs the tiny backend's shapes world, not {cfg.model.backend!r}")
    sigmas = sigma_schedule(cfg.sampler.num_steps, cfg.sampler.shift)
    bad = [k for k in steps if not 0 <= k < cfg.sampler.num_steps]
    if bad:
        raise ValueError(f"recovery steps {bad} are outside 0..{cfg.sampler.num_steps - 1}")
    policy = policy_from_config(cfg.model, "eval")
    prompts = [p for p in shapes_world.all_prompts("train", ("single",)) for _ in range(per_prompt)]
    x0 = render_batch(prompts, np.random.default_rng(seed))  # (B, 3, 32, 32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond = policy.encode_prompts(prompts)
    rows = []
    for k in steps:
        images = policy.decode(recover(policy.velocity, x0, noise, cond, sigmas, k))
        tally = shape_tally(prompts, images, range(len(prompts)))
        rows.append({"step": k, "sigma": float(sigmas[k]), **tally})
    return rows


def best_of_k(scores: np.ndarray, categories: Sequence[str], ks: Sequence[int]) -> dict[int, dict[str, float]]:
    """scores (P, K): each prompt's K draws; categories (P,) → {k: {"overall", category: mean over the category's
    prompts of the best of the first k draws}}, "overall" the mean over categories (the evaluation's macro mean)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(categories) or not len(categories):
        raise ValueError(f"need a (prompts, draws) score matrix for {len(categories)} prompts, got {scores.shape}")
    bad = [k for k in ks if not 1 <= k <= scores.shape[1]]
    if bad:
        raise ValueError(f"best of {bad}: only {scores.shape[1]} draws per prompt")
    cats = list(dict.fromkeys(categories))
    out = {}
    for k in ks:
        best = scores[:, :k].max(axis=1)
        per = {c: float(best[[x == c for x in categories]].mean()) for c in cats}
        out[k] = {"overall": float(np.mean(list(per.values()))), **per}
    return out


def draw_seed(set_seed: int, draw: int) -> int:
    """The noise seed of draw `draw` of held-out set `set_seed`: the set's own seed first (the evaluation's draw)."""
    return set_seed if draw == 0 else 10_000 * set_seed + draw


def best_of_draws(cfg, draws: int, set_seeds: Sequence[int], per_category: int, checkpoint=None) -> dict:
    """Every held-out prompt of each set drawn `draws` times by the evaluation sampler and scored by the verifier
    → {"draws", "sets": {set: best_of_k(...)}, "mean": {k: mean over the sets of the overall}} (tiny backend)."""
    from pathlib import Path

    from learner.evaluation.prompts import heldout_prompts
    from learner.evaluation.sampling import sample_images
    from learner.evaluation.scoring import image_scores
    from learner.tools.eval import load_models
    from services import shapes_world

    if cfg.model.backend != "tiny":
        raise ValueError(f"--best-of needs the tiny backend's shapes world, not {cfg.model.backend!r}")
    if draws < 1:
        raise ValueError(f"--best-of needs at least 1 draw, got {draws}")
    policy, _ = load_models(cfg, Path(checkpoint) if checkpoint else None, need_base=False)
    ks = sorted({2 ** i for i in range(draws.bit_length())} | {draws})  # 1, 2, 4 … and K itself
    sets = {}
    for set_seed in set_seeds:
        prompts = heldout_prompts(per_category, set_seed)
        scores = np.stack([image_scores(prompts, sample_images(policy, prompts, num_steps=cfg.sampler.num_steps,
                                                                shift=cfg.sampler.shift, seed=draw_seed(set_seed, j)),
                                        verifier=True)["verifier_score"] for j in range(draws)], axis=1)
        sets[set_seed] = best_of_k(scores, [shapes_world.category(p) for p in prompts], ks)
    mean = {k: float(np.mean([sets[s][k]["overall"] for s in set_seeds])) for k in ks}
    return {"draws": draws, "sets": sets, "mean": mean}


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| window start | reward | grad cosine (± sd) | SNR² per batch | batches for SNR 3 | reward mean "
             "| in-group std |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        its = r["iterations_for_snr3"]
        lines.append(f"| {r['window_start']} | {r['reward']} | {r['cosine']:.3f} (± {r['cosine_std']:.3f}) "
                     f"| {r['snr2']:.3f} | {'∞' if not np.isfinite(its) else f'{its:.0f}'} "
                     f"| {r['reward_mean']:.3f} | {r['reward_std_in_group']:.3f} |")
    return "\n".join(lines)


def brightness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Mean pixel value in [0, 1]: a reward with one dominant direction, the easy reference point."""
    return images.reshape(len(images), -1).mean(1).astype(np.float32) / 255.0


def dump_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner.tools.diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="preset or YAML file (repeatable)")
    p.add_argument("--batches", type=int, default=4, help="independent rollout batches (>= 2)")
    p.add_argument("--window-start", type=int, nargs="+", default=[0])
    p.add_argument("--no-brightness", action="store_true", help="skip the brightness reference reward")
    mode = p.add_mutually_exclusive_group()  # each "instead" replaces the gradient measurement, one at a time
    mode.add_argument("--shapes", action="store_true",
                      help="instead: how often the rollouts draw each shape asked for (tiny backend)")
    mode.add_argument("--recovery", type=int, nargs="+", default=None, metavar="STEP",
                      help="instead: noise rendered shapes to these steps' σ, finish them by the ODE (tiny)")
    mode.add_argument("--best-of", type=int, default=None, metavar="K",
                      help="instead: draw each held-out prompt K times, report the best of 1, 2, 4 … K (tiny)")
    mode.add_argument("--words", type=int, default=None, metavar="PAIRS",
                   help="instead: does the policy follow each kind of word (colour, shape, count, relation)? "
                        "PAIRS prompt pairs per kind (tiny)")
    p.add_argument("--seed", type=int, default=0, help="--words: the pair draw and noise seed")
    p.add_argument("--sets", type=int, nargs="+", default=[101, 102], help="--best-of: held-out set seeds")
    p.add_argument("--per-category", type=int, default=48, help="--best-of: prompts per category in each set")
    p.add_argument("--checkpoint", default=None, help="--best-of, --words: a run's checkpoint (default: the base)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.batch_size=128")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from learner.training import CheckpointError
    from services.config import ConfigError

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """The measurement `args` ask for, printed (and written to --json); bad input raises before the work."""
    from reward_servers.client import LocalRewards
    from services.config import load_config

    from . import check_output_file
    check_output_file(args.json, "--json")
    cfg = load_config(args.config, args.overrides)
    if args.words is not None:
        rows = word_sensitivity(cfg, args.words, args.seed, args.checkpoint)
        print(words_markdown(rows))
        dump_json(args.json, rows)
        return 0
    if args.best_of is not None:
        result = best_of_draws(cfg, args.best_of, args.sets, args.per_category, args.checkpoint)
        cats = [c for c in next(iter(result["sets"].values()))[1] if c != "overall"]
        print("| best of k | held-out score (mean of the sets) | " + " | ".join(f"set {s}" for s in result["sets"])
              + " | " + " | ".join(cats) + " (last set) |")
        print("|---:|---:|" + "---:|" * (len(result["sets"]) + len(cats)))
        last = list(result["sets"].values())[-1]
        for k, m in result["mean"].items():
            print(f"| {k} | {m:.3f} | " + " | ".join(f"{r[k]['overall']:.3f}" for r in result["sets"].values())
                  + " | " + " | ".join(f"{last[k][c]:.3f}" for c in cats) + " |")
        dump_json(args.json, result)
        return 0
    if args.recovery is not None:
        rows = shape_recovery(cfg, args.recovery)
        shapes = ("circle", "square", "triangle")
        print("| from step | σ | " + " | ".join(f"{s}s kept" for s in shapes) + " |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = " | ".join(f"{r[s]['hits']} of {r[s]['images']}" for s in shapes)
            print(f"| {r['step']} | {r['sigma']:.2f} | {cells} |")
        dump_json(args.json, rows)
        return 0
    if args.shapes:
        tally = rollout_shape_hits(cfg, args.window_start)
        print("| shape asked | images with it | groups with it |\n|---|---|---|\n" + "\n".join(
            f"| {shape} | {t['hits']} of {t['images']} | {t['groups_hit']} of {t['groups']} |" for shape, t in tally.items()))
        dump_json(args.json, tally)
        return 0
    if args.batches < 2:  # before any rollout
        raise ValueError(f"--batches must be >= 2 (the cosine is between independent batches), got {args.batches}")
    last = cfg.sampler.num_steps - 1 - cfg.window.size
    if bad := [w for w in args.window_start if not 0 <= w <= last]:
        raise ValueError(f"--window-start {bad}: a window of window.size={cfg.window.size} starts in [0, {last}] "
                         f"for sampler.num_steps={cfg.sampler.num_steps}")
    rewards: dict[str, RewardFn] = LocalRewards.from_specs(cfg.reward.rewards).fns
    if not args.no_brightness:
        rewards["brightness"] = brightness
    rows = gradient_snr(cfg, rewards, num_batches=args.batches, window_starts=args.window_start)
    print(markdown(rows))
    dump_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
