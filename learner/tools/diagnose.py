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
4 of 16 steps): the rule verifier and the learned reward c ≈ −0.01–0.03 (± 0.05 over 6 pairs, so four
batches cannot tell these from 0), a mean-brightness reward c ≈ 0.07–0.17; brightness is learned within
ten iterations, the default job's held-out gain (+0.015 on fresh sets) over 60. A clearly positive c
means a reward is learnable at this batch size; for c near 0 compare a run with a random-reward control
on fresh evaluation sets (README, "Results on the embedded default").

`--shapes` asks a prior question on the tiny backend: how often the training rollouts (the SDE window, groups of
`grpo.group_size`) draw the shape a single-object prompt asks for, in the asked colour, per shape, over every
train-split single-object prompt. A group none of whose images holds the shape has no advantage pointing toward
it. On the shipped base at windows 0, 4 and 8: squares in 2 of 144 images (2 of 18 groups), triangles 52 of 144
(15 of 18), circles 78 of 120 (15 of 15): README, "Where the gain comes from".

`--recovery STEP …` asks where along the trajectory a shape is decided: rendered single-object images (4 per
train-split prompt) are noised to σ_STEP and finished by the policy's ODE. On the shipped base at 16 steps,
shift 3, squares are kept from step 12 (σ 0.50: 21 of 24) and 10 (σ 0.64: 12 of 24), hardly from step 8
(σ 0.75: 4 of 24) or earlier; triangles likewise (24, 19, 15 of 24). The shape is decided at σ ≈ 0.75 → 0.5,
steps 8–12, which the default job's window (steps 0–6 over 30 iterations) never reaches.

`--best-of K` asks how much better the policy's own images get when it may pick: each held-out prompt of the
evaluation sets (`--sets`, `--per-category`) is drawn K times by the evaluation's ODE, draw 0 from the set's own
noise (so best of 1 is the evaluation's score) and draw j from seed 10000·set + j; the verifier scores each, and
best of k is the macro-averaged mean over prompts of the best of the first k draws (k = 1, 2, 4, …, K). A policy
that always drew its better of two images would score best of 2. On the shipped base, sets 101–102: 0.457, 0.569,
0.680, 0.763, 0.820 for k = 1, 2, 4, 8, 16 (README, "The headroom: the base's best of k draws").

`--words PAIRS` asks whether the policy reads each kind of word at all. For each kind (colour, shape, count,
relation), PAIRS train-split prompt pairs that differ in that word only ("a red circle" / "a red square") are drawn
from one shared noise by the evaluation's ODE. "Following" is how much more often an image carries the word asked
for than the word of its pair (`word_met`, read from the verifier's detections): 0 when the word is ignored, 1 when
it is always obeyed. The image change is the mean pixel change when only the word changes, over the change when
only the noise does. On the shipped base, 96 pairs each: colour +0.90 (± 0.02), shape +0.06 (± 0.04), count +0.11
(± 0.05), relation +0.02 (± 0.02); a shape word moves the image a quarter as much as a new noise, a relation word a
tenth. The base draws the asked colour and, for the rest, what its noise gives (README, "The base reads colour
words only").

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


WORD_CLASSES = ("colour", "shape", "count", "relation")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def word_pairs(word_class: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`n` pairs of train-split prompts that differ in one word of `word_class` only, drawn with replacement:
    colour "a red circle" / "a green circle"; shape "a red circle" / "a red square"; count "two red circles" /
    "three red circles"; relation "a red circle left of a blue square" / "… right of …" (two colours, so each
    object is told apart by its colour alone)."""
    from services import shapes_world as sw

    if word_class not in WORD_CLASSES:
        raise ValueError(f"unknown word class {word_class!r}; expected one of {WORD_CLASSES}")
    train = set(sw.all_prompts("train"))
    pool = []
    for spec in map(sw.parse, sorted(train)):
        (c, s, k), *rest = spec.objects
        if word_class == "colour" and spec.category == "single":
            pool += [(spec, sw.Spec("single", ((c2, s, 1),))) for c2 in sw.COLORS if c2 != c]
        elif word_class == "shape" and spec.category == "single":
            pool += [(spec, sw.Spec("single", ((c, s2, 1),))) for s2 in sw.SHAPES if s2 != s]
        elif word_class == "count" and spec.category == "counting":
            pool.append((spec, sw.Spec("counting", ((c, s, 5 - k),))))
        elif word_class == "relation" and spec.category == "position" and rest[0][0] != c:
            pool.append((spec, sw.Spec("position", spec.objects, _OPPOSITE[spec.relation])))
    pairs = [(sw.format_spec(a), sw.format_spec(b)) for a, b in pool]
    pairs = [(a, b) for a, b in pairs if b in train]
    return [pairs[i] for i in rng.integers(len(pairs), size=n)]


def word_met(word_class: str, prompt: str, found: Sequence) -> bool:
    """Does an image (its `detect` result) carry `prompt`'s word of `word_class`? colour: an object of the colour;
    shape: an object of the colour in the shape; count: exactly that many objects of the colour (any shape, so
    the shape word does not count twice); relation: the largest object of each colour stands in the relation
    (the verifier's margin)."""
    from services import shapes_world as sw

    spec = sw.parse(prompt)
    (c, s, k), *rest = spec.objects
    if word_class == "colour":
        return any(d.color == c for d in found)
    if word_class == "shape":
        return any((d.color, d.shape) == (c, s) for d in found)
    if word_class == "count":
        return sum(d.color == c for d in found) == k
    if word_class == "relation":
        largest = [max((d for d in found if d.color == col), key=lambda d: d.area, default=None)
                   for col in (c, rest[0][0])]
        return None not in largest and sw.relation_holds(largest[0].centroid, largest[1].centroid, spec.relation)
    raise ValueError(f"unknown word class {word_class!r}; expected one of {WORD_CLASSES}")


def word_following(met_a: np.ndarray, met_a_in_b: np.ndarray, met_b: np.ndarray, met_b_in_a: np.ndarray) -> dict:
    """Pairs (a, b) drawn from one noise each: met_a[i] = image a carries a's word, met_a_in_b[i] = image b carries
    a's word, and the same from b's side → {"met", "met_other", "following", "following_se"}: how often an image
    carries the word asked, how often it carries it when the other word was asked, and their difference (0: the
    word is ignored, 1: always followed), with its standard error over pairs."""
    met_a, met_a_in_b, met_b, met_b_in_a = (np.asarray(m, np.float64) for m in (met_a, met_a_in_b, met_b, met_b_in_a))
    met, other = np.concatenate([met_a, met_b]), np.concatenate([met_a_in_b, met_b_in_a])
    per_pair = 0.5 * ((met_a - met_a_in_b) + (met_b - met_b_in_a))
    if not len(per_pair):
        raise ValueError("no prompt pairs")
    se = float(per_pair.std(ddof=1) / np.sqrt(len(per_pair))) if len(per_pair) > 1 else float("nan")
    return {"met": float(met.mean()), "met_other": float(other.mean()), "following": float(per_pair.mean()),
            "following_se": se}


def word_sensitivity(cfg, pairs_per_class: int, seed: int = 0, checkpoint=None,
                     classes: Sequence[str] = WORD_CLASSES) -> list[dict]:
    """Does the policy follow each kind of word? For each word class, `pairs_per_class` prompt pairs that differ in
    that word only (`word_pairs`), each pair drawn by the evaluation's ODE from one shared noise, and prompt a once
    more from a second noise → rows {"word", "pairs", "met", "met_other", "following", "following_se",
    "image_change"}: `word_following` of the pairs, and the mean absolute pixel change when only the word changes
    over the change when only the noise does (0: the word moves no pixel; about 1: as much as a new noise)."""
    from pathlib import Path

    from learner.evaluation.sampling import initial_noise, sample_images
    from learner.tools.eval import load_models
    from services import shapes_world as sw

    if cfg.model.backend != "tiny":
        raise ValueError(f"--words needs the tiny backend's shapes world, not {cfg.model.backend!r}")
    if pairs_per_class < 2:
        raise ValueError(f"--words needs at least 2 pairs per word class, got {pairs_per_class}")
    policy, _ = load_models(cfg, Path(checkpoint) if checkpoint else None, need_base=False)
    rows = []
    for i, word_class in enumerate(classes):
        pairs = word_pairs(word_class, pairs_per_class, np.random.default_rng(seed + i))
        a, b = [p for p, _ in pairs], [p for _, p in pairs]
        noise = initial_noise(policy.latent_shape, len(pairs), seed + i)
        draw = {k: sample_images(policy, ps, num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift, noise=nz)
                for k, ps, nz in (("a", a, noise), ("b", b, noise),
                                  ("a2", a, initial_noise(policy.latent_shape, len(pairs), seed + 1000 + i)))}
        found = {k: [sw.detect(im) for im in ims] for k, ims in draw.items()}

        def met(prompts, key, word_class=word_class, found=found):
            return np.array([word_met(word_class, p, f) for p, f in zip(prompts, found[key], strict=True)])

        pixels = {k: v.astype(np.float64) for k, v in draw.items()}
        change = float(np.abs(pixels["a"] - pixels["b"]).mean() / np.abs(pixels["a"] - pixels["a2"]).mean())
        rows.append({"word": word_class, "pairs": len(pairs), **word_following(met(a, "a"), met(a, "b"),
                                                                                 met(b, "b"), met(b, "a")),
                     "image_change": change})
    return rows


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="preset or YAML file (repeatable)")
    p.add_argument("--batches", type=int, default=4, help="independent rollout batches (>= 2)")
    p.add_argument("--window-start", type=int, nargs="+", default=[0])
    p.add_argument("--no-brightness", action="store_true", help="skip the brightness reference reward")
    p.add_argument("--shapes", action="store_true",
                   help="instead: how often the rollouts draw each shape asked for (tiny backend)")
    p.add_argument("--recovery", type=int, nargs="+", default=None, metavar="STEP",
                   help="instead: noise rendered shapes to these steps' σ, finish them by the ODE (tiny)")
    p.add_argument("--best-of", type=int, default=None, metavar="K",
                   help="instead: draw each held-out prompt K times, report the best of 1, 2, 4 … K (tiny)")
    p.add_argument("--words", type=int, default=None, metavar="PAIRS",
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
    from reward_servers.client import LocalRewards
    from services.config import ConfigError, load_config

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.words is not None:
        try:
            rows = word_sensitivity(cfg, args.words, args.seed, args.checkpoint)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("| word | pairs | carried when asked | carried when the other was asked | following (± se) "
              "| image change: word / noise |\n|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['word']} | {r['pairs']} | {r['met']:.2f} | {r['met_other']:.2f} | {r['following']:+.2f} "
                  f"(± {r['following_se']:.2f}) | {r['image_change']:.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.best_of is not None:
        try:
            result = best_of_draws(cfg, args.best_of, args.sets, args.per_category, args.checkpoint)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cats = [c for c in next(iter(result["sets"].values()))[1] if c != "overall"]
        print("| best of k | held-out score (mean of the sets) | " + " | ".join(f"set {s}" for s in result["sets"])
              + " | " + " | ".join(cats) + " (last set) |")
        print("|---:|---:|" + "---:|" * (len(result["sets"]) + len(cats)))
        last = list(result["sets"].values())[-1]
        for k, m in result["mean"].items():
            print(f"| {k} | {m:.3f} | " + " | ".join(f"{r[k]['overall']:.3f}" for r in result["sets"].values())
                  + " | " + " | ".join(f"{last[k][c]:.3f}" for c in cats) + " |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if args.recovery is not None:
        try:
            rows = shape_recovery(cfg, args.recovery)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        shapes = ("circle", "square", "triangle")
        print("| from step | σ | " + " | ".join(f"{s}s kept" for s in shapes) + " |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = " | ".join(f"{r[s]['hits']} of {r[s]['images']}" for s in shapes)
            print(f"| {r['step']} | {r['sigma']:.2f} | {cells} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.shapes:
        try:
            tally = rollout_shape_hits(cfg, args.window_start)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("| shape asked | images with it | groups with it |\n|---|---|---|")
        for shape, t in tally.items():
            print(f"| {shape} | {t['hits']} of {t['images']} | {t['groups_hit']} of {t['groups']} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(tally, f, indent=1)
        return 0
    rewards: dict[str, RewardFn] = LocalRewards.from_specs(cfg.reward.rewards).fns
    if not args.no_brightness:
        rewards["brightness"] = brightness
    rows = gradient_snr(cfg, rewards, num_batches=args.batches, window_starts=args.window_start)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
