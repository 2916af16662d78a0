"""Unit tests for services/shapes_world.py: grammar, split, renderer, verifier and corruptions (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import shapes_world as sw

N_PER_SPLIT = 600  # renders per split for the agreement test (>= 1000 in all)
N_CORRUPT = 200  # renders per corruption kind


def _renders(split: str, n: int, seed: int, categories: tuple[str, ...] | None = None):
    """[(prompt, image (32, 32, 3) uint8)] with fixed seeds."""
    rng = np.random.default_rng(seed)
    return [(p, sw.render(p, rng)) for p in sw.sample_prompts(n, rng, split=split, categories=categories)]


@pytest.fixture(scope="module")
def rendered() -> list[tuple[str, np.ndarray]]:
    return _renders("train", N_PER_SPLIT, 0) + _renders("heldout", N_PER_SPLIT, 1)


# --------------------------------------------------------------------------------------------- renderer


def test_verifier_agrees_with_renderer(rendered):
    strict = [sw.verify(p, img).strict for p, img in rendered]
    assert len(rendered) >= 1000
    assert np.mean(strict) >= 0.99
    assert {sw.category(p) for p, _ in rendered} == set(sw.CATEGORIES)


def test_render_uses_only_prompt_colours_and_separate_objects(rendered):
    for prompt, img in rendered[:300]:
        spec = sw.parse(prompt)
        allowed = {(0, 0, 0)} | {sw.PALETTE[c] for c, _, _ in spec.objects}
        assert {tuple(px) for px in img.reshape(-1, 3).tolist()} <= allowed, prompt
        assert len(sw.detect(img)) == sum(n for _, _, n in spec.objects), prompt


def test_render_is_deterministic_given_rng_state():
    for prompt in ["three white triangles", "a red circle above a blue square"]:
        a = sw.render(prompt, np.random.default_rng(7))
        b = sw.render(prompt, np.random.default_rng(7))
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 10_000))
def test_any_seed_renders_a_verified_image(seed, index):
    prompts = sw.all_prompts("train") + sw.all_prompts("heldout")
    prompt = prompts[index % len(prompts)]
    assert sw.verify(prompt, sw.render(prompt, np.random.default_rng(seed))).strict


def test_verify_tolerates_mild_noise(rendered):
    rng = np.random.default_rng(3)
    passed = []
    for prompt, img in rendered[::3]:
        noisy = np.clip(img + rng.normal(0.0, 10.0, img.shape), 0, 255).astype(np.uint8)
        passed.append(sw.verify(prompt, noisy).strict)
    assert np.mean(passed) >= 0.95


# ------------------------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("kind", sw.CORRUPTIONS)
def test_verifier_rejects_each_corruption(kind):
    categories = ("position",) if kind == "move" else None
    rng = np.random.default_rng(11)
    rejected = []
    pairs = _renders("train", N_CORRUPT // 2, 10, categories) + _renders("heldout", N_CORRUPT // 2, 12, categories)
    for i, (prompt, img) in enumerate(pairs):
        bad = sw.corrupt(prompt, img, rng, kind)
        assert bad.shape == img.shape and bad.dtype == np.uint8
        assert not np.array_equal(bad, img), (kind, prompt, i)
        rejected.append(not sw.verify(prompt, bad).strict)
    assert np.mean(rejected) >= 0.95, kind


def test_corrupt_argument_errors():
    img = sw.render("a red circle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="kind must be one of"):
        sw.corrupt("a red circle", img, np.random.default_rng(0), "blur")
    with pytest.raises(ValueError, match="'move' needs a position prompt"):
        sw.corrupt("a red circle", img, np.random.default_rng(0), "move")
    with pytest.raises(ValueError, match="no objects"):
        sw.corrupt("a red circle", np.zeros_like(img), np.random.default_rng(0), "remove")


# ------------------------------------------------------------------------------- partial credit (worked)


def test_partial_credit_worked_examples():
    rng = np.random.default_rng(5)
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    # Missing one of two circles: colour 1 + shape 1 + count 0 = 2 / 3.
    v = sw.verify("two red circles", sw.render("a red circle", rng))
    assert v.score == pytest.approx(2 / 3) and not v.strict
    # Wrong shape: colour 1 + shape 0 + count 0 = 1 of 3, and the red square is an extra: 1 / (3 + 1).
    assert sw.verify("a red circle", sw.render("a red square", rng)).score == pytest.approx(1 / 4)
    # Wrong colour: colour 0 + shape 1 + count 0, the blue circle is an extra: 1 / 4.
    assert sw.verify("a red circle", sw.render("a blue circle", rng)).score == pytest.approx(1 / 4)
    # Everything right plus an unrequested object: 3 / (3 + 1).
    v = sw.verify("a red circle", sw.render("a red circle and a green square", rng))
    assert v.score == pytest.approx(3 / 4) and not v.strict
    # Blue square drawn red: 3 for the red circle + (colour 0 + shape 1 + count 0) for the blue square = 4 of 6
    # points (the red square supplies "some square"), and the red square is an extra: 4 / (6 + 1).
    img = sw.render("a red circle and a red square", rng)
    assert sw.verify("a red circle and a blue square", img).score == pytest.approx(4 / 7)
    # Position prompt with only the relation wrong: 6 / 7.
    img = sw.render("a red circle left of a blue square", rng)
    v = sw.verify("a red circle right of a blue square", img)
    assert v.score == pytest.approx(6 / 7) and not v.strict
    # Nothing drawn: 0, and a perfect render: 1.
    assert sw.verify("three green triangles", blank) == sw.Verdict(0.0, False)
    assert sw.verify("three green triangles", sw.render("three green triangles", rng)) == sw.Verdict(1.0, True)


def test_verify_rejects_bad_images():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="dtype uint8"):
        sw.verify("a red circle", img.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shape"):
        sw.verify("a red circle", np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="numpy array"):
        sw.verify("a red circle", img.tolist())


# ----------------------------------------------------------------------------------------- held-out split


def test_heldout_pairs_are_a_fifth_of_all_pairs():
    assert len(set(sw.HELDOUT_PAIRS)) == 4
    assert all(c in sw.COLORS and s in sw.SHAPES for c, s in sw.HELDOUT_PAIRS)
    assert {s for _, s in sw.HELDOUT_PAIRS} == set(sw.SHAPES)


def test_split_membership():
    train, heldout = sw.all_prompts("train"), sw.all_prompts("heldout")
    assert not set(train) & set(heldout)
    assert not any(sw.is_heldout(p) for p in train)
    assert all(sw.is_heldout(p) for p in heldout)
    for prompts in (train, heldout):
        assert {sw.category(p) for p in prompts} == set(sw.CATEGORIES)
    # Every prompt of the grammar (with article "a" for one) is in exactly one split.
    assert len(train) + len(heldout) == 21 + 42 + 420 + 420 * 4


def test_sample_prompts_honours_split_and_categories():
    rng = np.random.default_rng(0)
    for split in sw.SPLITS:
        prompts = sw.sample_prompts(400, rng, split=split)
        assert set(prompts) <= set(sw.all_prompts(split))
        counts = {c: sum(sw.category(p) == c for p in prompts) for c in sw.CATEGORIES}
        assert min(counts.values()) > 60, counts  # uniform over categories: ~100 each
    only = sw.sample_prompts(50, rng, split="heldout", categories=("counting",))
    assert {sw.category(p) for p in only} == {"counting"}
    assert sw.sample_prompts(5, np.random.default_rng(1)) == sw.sample_prompts(5, np.random.default_rng(1))
    with pytest.raises(ValueError, match="split must be one of"):
        sw.sample_prompts(3, rng, split="test")
    with pytest.raises(ValueError, match="categories must be"):
        sw.sample_prompts(3, rng, categories=("colors",))


# ------------------------------------------------------------------------------------------------ grammar


def test_parse_examples_and_normalisation():
    assert sw.parse("a red circle") == sw.Spec("single", (("red", "circle", 1),))
    assert sw.parse("  Two  BLUE squares. ") == sw.Spec("counting", (("blue", "square", 2),))
    assert sw.parse("one red circle") == sw.Spec("counting", (("red", "circle", 1),))
    assert sw.parse("a red circle and a blue square").category == "two_objects"
    spec = sw.parse("a red circle left of a blue square")
    assert spec == sw.Spec("position", (("red", "circle", 1), ("blue", "square", 1)), "left of")


def test_parse_round_trips_every_prompt():
    for prompt in sw.all_prompts("train") + sw.all_prompts("heldout") + ["one red circle"]:
        assert sw.format_spec(sw.parse(prompt)) == prompt


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a purple circle", "unknown word 'purple'.*colour"),
        ("four red squares", "unknown word 'four'.*count"),
        ("a red circle near a blue square", "unknown word 'near'.*relation"),
        ("", "empty prompt"),
        ("two red circle", "expected a shape.*'circles'"),
        ("a red circles", "expected a shape.*'circle'"),
        ("red a circle", "expected a count"),
        ("a circle", "should be '<count> <colour> <shape>'"),
        ("a red circle and a red circle", "must differ"),
        ("two red circles and a blue square", "article 'a'"),
        ("a red circle and a blue square and a green triangle", "at most one"),
        ("a red circle left a blue square", "should be '<count> <colour> <shape>'"),
    ],
)
def test_out_of_grammar_prompts_raise_helpful_errors(prompt, message):
    with pytest.raises(ValueError, match=message) as err:
        sw.parse(prompt)
    assert repr(prompt) in str(err.value)


def test_vocabulary_covers_every_prompt_word():
    words = {w for s in sw.SPLITS for p in sw.all_prompts(s) for w in p.split()}
    assert words <= set(sw.VOCABULARY)
    assert list(sw.VOCABULARY) == sorted(set(sw.VOCABULARY))
    assert set(sw.VOCABULARY) - words == {"one"}  # only reachable through the parser's "one <colour> <shape>"


def test_requirements_count_what_the_score_is_made_of():
    """`requirements` is `verify` before the arithmetic: the worked examples above, requirement by requirement."""
    rng = np.random.default_rng(5)
    R = sw.Requirements
    # "two red circles" drawn as one red circle and one red square: colour, shape, no count, one extra → 2 / 4.
    r = sw.requirements("two red circles", sw.render("a red circle and a red square", rng))
    assert r == R(objects=1, colour=1, shape=1, count=0, relation=None, extras=1, found=2)
    assert r.verdict == sw.verify("two red circles", sw.render("a red circle and a red square",
                                                              np.random.default_rng(5))) == sw.Verdict(0.5, False)
    # A red square for "a red circle": colour only, and the square is an extra.
    assert sw.requirements("a red circle", sw.render("a red square", rng)) == R(1, 1, 0, 0, None, 1, 1)
    # Only the relation wrong: 6 of 7 points, no extras.
    img = sw.render("a red circle left of a blue square", rng)
    r = sw.requirements("a red circle right of a blue square", img)
    assert r == R(2, 2, 2, 2, False, 0, 2) and r.verdict.score == pytest.approx(6 / 7)
    assert sw.requirements("a red circle left of a blue square", img).relation is True
    # Nothing drawn; a perfect count.
    assert sw.requirements("three green triangles", np.zeros((32, 32, 3), np.uint8)) == R(1, 0, 0, 0, None, 0, 0)
    assert sw.requirements("three green triangles", sw.render("three green triangles", rng)) == R(1, 1, 1, 1, None,
                                                                                                  0, 3)


def test_requirements_against_an_independent_count_on_corrupted_renders():
    """The counts recomputed from the detections another way (a Counter of (colour, shape) pairs), on renders broken
    in each way; the verdict is GenEval's arithmetic on them."""
    from collections import Counter

    rng = np.random.default_rng(11)
    for prompt in sw.sample_prompts(40, rng, split="train"):
        spec = sw.parse(prompt)
        for kind in ("recolor", "remove", "reshape", "add"):
            img = sw.corrupt(prompt, sw.render(prompt, rng), rng, kind)
            found = sw.detect(img)
            pairs, colours, shapes = Counter((d.color, d.shape) for d in found), {d.color for d in found}, \
                {d.shape for d in found}
            r = sw.requirements(prompt, img)
            assert (r.objects, r.found) == (len(spec.objects), len(found))
            assert r.colour == sum(c in colours for c, _, _ in spec.objects)
            assert r.shape == sum(s in shapes for _, s, _ in spec.objects)
            assert r.count == sum(pairs[(c, s)] == n for c, s, n in spec.objects)
            assert r.extras == sum(k for (c, s), k in pairs.items() if (c, s) not in {o[:2] for o in spec.objects})
            assert (r.relation is None) == (spec.relation is None)
            points = r.colour + r.shape + r.count + bool(r.relation)
            total = 3 * r.objects + (spec.relation is not None)
            assert r.verdict.score == pytest.approx(points / (total + r.extras)) == sw.verify(prompt, img).score
