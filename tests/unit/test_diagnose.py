"""The gradient signal-to-noise diagnostic: its arithmetic, and that it separates a learnable reward from noise."""

import itertools

import numpy as np
import pytest
import torch

from learner.tools.diagnose import brightness, gradient_snr, iterations_for_snr, pairwise_cosine, snr_squared
from services.config import load_config


def test_pairwise_cosine_matches_the_signal_plus_noise_formula():
    # g_i = s + n_i, |s|^2 = 1, E|n|^2 = 3  =>  E cos = 1 / (1 + 3) = 0.25, SNR^2 = 1/3
    gen = torch.Generator().manual_seed(0)
    d = 4000
    s = torch.randn(d, generator=gen)
    s /= s.norm()
    grads = [s + torch.randn(d, generator=gen) * (3.0 / d) ** 0.5 for _ in range(12)]
    cos = pairwise_cosine(grads)
    assert cos.shape == (66,)
    assert abs(cos.mean() - 0.25) < 0.02
    assert abs(snr_squared(cos.mean()) - 1 / 3) < 0.04
    # and against a direct computation of one pair
    a, b = grads[0], grads[1]
    assert cos[0] == pytest.approx(float(torch.dot(a, b) / (a.norm() * b.norm())), rel=1e-6)


def test_iterations_for_snr_worked_examples():
    # c = 0.1 -> SNR^2 = 1/9 per batch -> 9 / (1/9) = 81 batches for SNR 3
    assert iterations_for_snr(0.1) == pytest.approx(81.0)
    assert iterations_for_snr(0.5, k=2.0) == pytest.approx(4.0)
    assert iterations_for_snr(0.0) == float("inf")
    assert iterations_for_snr(-0.02) == float("inf")
    with pytest.raises(ValueError):
        pairwise_cosine([torch.ones(3)])
    assert np.isnan(pairwise_cosine([torch.zeros(3), torch.ones(3)])[0])


def test_a_learnable_reward_has_more_gradient_signal_than_an_image_blind_one():
    torch.set_num_threads(1)
    cfg = load_config([], ["rollout.batch_size=64", "sampler.num_steps=6", "window.size=2"])
    counter = itertools.count()

    def blind(images, prompts):  # scores that ignore the images: no signal by construction
        return np.random.default_rng(next(counter)).random(len(images)).astype(np.float32)

    # measured: brightness 0.112 ± 0.030, blind -0.026 ± 0.031 (mean ± sd over the 10 pairs)
    rows = gradient_snr(cfg, {"brightness": brightness, "blind": blind}, num_batches=5)
    by = {r["reward"]: r for r in rows}
    assert by["brightness"]["cosine"] > max(0.04, 2 * by["brightness"]["cosine_std"])  # clear of its own noise
    assert abs(by["blind"]["cosine"]) < 2 * by["blind"]["cosine_std"]  # within the pair-to-pair noise of 0
    assert by["brightness"]["cosine"] > by["blind"]["cosine"] + 0.04
    assert by["brightness"]["iterations_for_snr3"] < by["blind"]["iterations_for_snr3"]


def test_shape_tally_worked_example():
    """Rendered images: a group counts as hit when any of its images holds the asked shape in the asked colour;
    an object of the right shape in another colour is no hit; other categories are skipped."""
    from learner.tools.diagnose import shape_tally
    from services import shapes_world as sw

    rng = np.random.default_rng(0)
    rows = [("a red square", "a red square", "g1"), ("a red square", "a red circle", "g1"),  # group 1: one hit
            ("a red square", "a blue square", "g2"), ("a red square", "a red circle", "g2"),  # group 2: none
            ("a green triangle", "a green triangle", "g3"),
            ("two red squares", "two red squares", "g4")]  # counting: skipped
    prompts = [p for p, _, _ in rows]
    images = np.stack([sw.render(drawn, rng) for _, drawn, _ in rows])
    tally = shape_tally(prompts, images, [g for _, _, g in rows])
    assert tally == {"circle": {"images": 0, "hits": 0, "groups": 0, "groups_hit": 0},
                     "square": {"images": 4, "hits": 1, "groups": 2, "groups_hit": 1},
                     "triangle": {"images": 1, "hits": 1, "groups": 1, "groups_hit": 1}}


def test_rollout_shape_hits_counts_every_group_once(capsys):
    from learner.tools.diagnose import main, rollout_shape_hits
    from services import shapes_world as sw

    torch.set_num_threads(1)
    cfg = load_config([], ["sampler.num_steps=4", "window.size=2", "grpo.group_size=2", "rollout.batch_size=16"])
    tally = rollout_shape_hits(cfg, window_starts=(0, 1))
    singles = [sw.parse(p).objects[0][1] for p in sw.all_prompts("train", ("single",))]
    for shape, t in tally.items():  # every train single prompt: one group of 2 per window start
        assert t["groups"] == 2 * singles.count(shape) and t["images"] == 2 * t["groups"]
        assert 0 <= t["groups_hit"] <= t["groups"] and t["groups_hit"] <= t["hits"] <= t["images"]
    assert rollout_shape_hits(cfg, window_starts=(0, 1)) == tally  # same weights, prompts and noise
    assert main(["--shapes", "sampler.num_steps=4", "window.size=2", "grpo.group_size=2",
                 "rollout.batch_size=16"]) == 0
    assert "| square |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="outside 0..1"):
        rollout_shape_hits(cfg, window_starts=(2,))


def test_recover_with_the_true_velocity_returns_the_clean_images():
    """The straight path x_σ = (1 − σ)·x0 + σ·ε has velocity ε − x0 at every σ, so Euler from any step lands
    on x0 exactly; from step 0 (σ = 1) `recover` is plain sampling from the noise."""
    from learner.algo.sampler import sample_ode
    from learner.algo.schedule import sigma_schedule
    from learner.tools.diagnose import recover, shape_tally
    from learner.tools.pretrain import render_batch
    from rollout_workers.policies.base import to_uint8_images

    prompts = ["a red square", "a green triangle", "a blue circle", "a white square"]
    x0 = render_batch(prompts, np.random.default_rng(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    sigmas = sigma_schedule(8, 3.0)
    true_velocity = lambda x, s, c: noise - x0  # noqa: E731
    for step in (0, 3, 7):
        out = recover(true_velocity, x0, noise, {}, sigmas, step)
        assert torch.allclose(out, x0, atol=1e-5)
    tally = shape_tally(prompts, to_uint8_images(recover(true_velocity, x0, noise, {}, sigmas, 5)), range(4))
    assert {s: (t["hits"], t["images"]) for s, t in tally.items()} == {"circle": (1, 1), "square": (2, 2),
                                                                        "triangle": (1, 1)}
    pull = lambda x, s, c: x  # noqa: E731  ignores x0: from σ = 1 it is sampling, not recovery
    assert torch.equal(recover(pull, x0, noise, {}, sigmas, 0), sample_ode(pull, noise, {}, sigmas))


def test_shape_recovery_bookkeeping_and_cli(capsys):
    from learner.tools.diagnose import main, shape_recovery
    from services import shapes_world as sw

    torch.set_num_threads(1)
    cfg = load_config([], ["sampler.num_steps=4", "window.size=2"])
    rows = shape_recovery(cfg, steps=(0, 3), per_prompt=1)
    singles = [sw.parse(p).objects[0][1] for p in sw.all_prompts("train", ("single",))]
    assert [r["step"] for r in rows] == [0, 3] and rows[0]["sigma"] == 1.0 and 0 < rows[1]["sigma"] < 1
    for r in rows:
        for shape in sw.SHAPES:
            assert r[shape]["images"] == singles.count(shape) and 0 <= r[shape]["hits"] <= r[shape]["images"]
    assert shape_recovery(cfg, steps=(3,), per_prompt=1) == rows[1:]  # the same renders and noise
    assert main(["sampler.num_steps=4", "window.size=2", "--recovery", "3"]) == 0
    assert "| 3 | 0.50 |" in capsys.readouterr().out
    assert main(["sampler.num_steps=4", "window.size=2", "--recovery", "4"]) == 2
    assert "outside 0..3" in capsys.readouterr().err


def test_best_of_k_worked_example():
    from learner.tools.diagnose import best_of_k, draw_seed

    # two categories; a: prompts (0.2, 0.6, 0.4) and (1.0, 0.0, 0.0); b: one prompt (0.5, 0.5, 0.9)
    scores = np.array([[0.2, 0.6, 0.4], [1.0, 0.0, 0.0], [0.5, 0.5, 0.9]])
    got = best_of_k(scores, ["a", "a", "b"], [1, 2, 3])
    assert got[1] == pytest.approx({"overall": (0.6 + 0.5) / 2, "a": 0.6, "b": 0.5})  # a: (0.2 + 1.0) / 2
    assert got[2] == pytest.approx({"overall": (0.8 + 0.5) / 2, "a": 0.8, "b": 0.5})  # a: (0.6 + 1.0) / 2
    assert got[3] == pytest.approx({"overall": (0.8 + 0.9) / 2, "a": 0.8, "b": 0.9})
    with pytest.raises(ValueError, match="only 3 draws"):
        best_of_k(scores, ["a", "a", "b"], [4])
    with pytest.raises(ValueError, match="score matrix"):
        best_of_k(scores[:, 0], ["a", "a", "b"], [1])
    assert draw_seed(101, 0) == 101 and draw_seed(101, 3) == 1_010_003  # draw 0 is the evaluation's own noise


def test_best_of_one_is_the_evaluation_and_more_draws_never_score_less(capsys):
    from learner.evaluation import evaluate
    from learner.evaluation.prompts import heldout_prompts
    from learner.tools.diagnose import best_of_draws, main
    from learner.tools.eval import load_models

    torch.set_num_threads(1)
    cfg = load_config([], ["sampler.num_steps=4", "window.size=2"])
    result = best_of_draws(cfg, 3, [7], per_category=2)
    assert list(result["mean"]) == [1, 2, 3]
    policy, _ = load_models(cfg, None, need_base=False)
    plain = evaluate(policy, heldout_prompts(2, 7), num_steps=4, shift=cfg.sampler.shift, seed=7, verifier=True)
    assert result["sets"][7][1]["overall"] == pytest.approx(plain["overall"]["verifier_score"], abs=1e-12)
    means = list(result["mean"].values())
    assert means == sorted(means)
    assert main(["sampler.num_steps=4", "window.size=2", "--best-of", "2", "--sets", "7", "--per-category", "1"]) == 0
    assert "| 2 |" in capsys.readouterr().out
    assert main(["--best-of", "0", "--sets", "7", "--per-category", "1"]) == 2
    assert "at least 1 draw" in capsys.readouterr().err


def test_word_pairs_differ_in_exactly_one_word_of_their_class():
    from learner.tools.words import WORD_CLASSES, word_pairs
    from services import shapes_world as sw

    train = set(sw.all_prompts("train"))
    for word_class in WORD_CLASSES:
        pairs = word_pairs(word_class, 40, np.random.default_rng(0))
        assert len(pairs) == 40 and len(set(pairs)) > 10
        for a, b in pairs:
            assert a in train and b in train and a != b
            sa, sb = sw.parse(a), sw.parse(b)
            (ca, ka, na), *ra = sa.objects
            (cb, kb, nb), *rb = sb.objects
            changed = {"colour": ca != cb, "shape": ka != kb, "count": na != nb, "relation": sa.relation != sb.relation}
            assert [w for w, c in changed.items() if c] == [word_class], (a, b)
            assert ra == rb and sa.category == sb.category
            if word_class == "relation":
                assert ra[0][0] != ca  # two colours: the objects are told apart by colour
    with pytest.raises(ValueError, match="unknown word class"):
        word_pairs("size", 1, np.random.default_rng(0))


def test_word_met_on_renders():
    from learner.tools.words import word_met
    from services import shapes_world as sw

    rng = np.random.default_rng(0)

    def found(prompt):
        return sw.detect(sw.render(prompt, rng))

    circle = found("a red circle")
    assert word_met("colour", "a red circle", circle) and not word_met("colour", "a green circle", circle)
    assert word_met("shape", "a red circle", circle) and not word_met("shape", "a red square", circle)
    two = found("two green squares")
    assert word_met("count", "two green squares", two) and not word_met("count", "three green squares", two)
    assert word_met("count", "two green circles", two)  # the count word is read on the colour alone
    pair = found("a red circle left of a blue square")
    assert word_met("relation", "a red circle left of a blue square", pair)
    assert not word_met("relation", "a red circle right of a blue square", pair)
    assert not word_met("relation", "a red circle left of a green square", pair)  # no green object at all


def test_word_following_worked_example():
    from learner.tools.words import word_following

    # pair 1 follows the word both ways, pair 2 ignores it (both images carry a's word), pair 3 follows a's side only
    got = word_following(met_a=[1, 1, 1], met_a_in_b=[0, 1, 0], met_b=[1, 0, 0], met_b_in_a=[0, 0, 0])
    per_pair = np.array([1.0, 0.0, 0.5])
    assert got["met"] == pytest.approx(4 / 6) and got["met_other"] == pytest.approx(1 / 6)
    assert got["following"] == pytest.approx(0.5)
    assert got["following_se"] == pytest.approx(per_pair.std(ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError, match="no prompt pairs"):
        word_following([], [], [], [])


def test_a_policy_deaf_to_the_prompt_follows_no_word_and_the_cli(capsys, monkeypatch):
    from learner.tools import eval as eval_tool
    from learner.tools.diagnose import main
    from learner.tools.words import word_sensitivity

    torch.set_num_threads(1)
    cfg = load_config([], ["sampler.num_steps=4", "window.size=2"])
    rows = word_sensitivity(cfg, 6, seed=3, classes=("colour", "relation"))
    assert [r["word"] for r in rows] == ["colour", "relation"] and all(r["pairs"] == 6 for r in rows)
    assert all(r["image_change"] > 0 for r in rows)
    plain = eval_tool.load_models

    def deaf(*args, **kwargs):  # the same policy, its prompt encoder fixed to one prompt: it hears no word
        policy, base = plain(*args, **kwargs)
        encode = policy.encode_prompts
        policy.encode_prompts = lambda prompts: encode(["a red circle"] * len(prompts))
        return policy, base

    monkeypatch.setattr(eval_tool, "load_models", deaf)
    for r in word_sensitivity(cfg, 6, seed=3):
        assert r["following"] == 0.0 and r["image_change"] == 0.0 and r["met"] == r["met_other"]
    monkeypatch.setattr(eval_tool, "load_models", plain)
    assert main(["sampler.num_steps=4", "window.size=2", "--words", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {w} | 3 |" in out for w in ("colour", "shape", "count", "relation"))
    assert main(["--words", "1"]) == 2
    assert "at least 2 pairs" in capsys.readouterr().err
