"""Does a policy follow each kind of word? `python -m learner.tools.diagnose --words PAIRS` (tiny backend).

For each kind (colour, shape, count, relation), prompt pairs that differ in that word only are drawn from one shared
noise by the evaluation's ODE; "following" is how much more often an image carries the word asked for than the word
of its pair (0: ignored, 1: always obeyed), and the image change is the pixel change the word makes over the change a
new noise makes. The measurements: `learner.tools.diagnose`'s docstring and the README ("The base reads colour words
only").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    """`word_sensitivity`'s rows as a markdown table."""
    lines = ["| word | pairs | carried when asked | carried when the other was asked | following (± se) "
             "| image change: word / noise |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['word']} | {r['pairs']} | {r['met']:.2f} | {r['met_other']:.2f} | {r['following']:+.2f} "
                     f"(± {r['following_se']:.2f}) | {r['image_change']:.2f} |")
    return "\n".join(lines)
