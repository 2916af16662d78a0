"""The one evaluation path (`learner.evaluation`): balanced held-out prompts, the (hybrid) ODE sampler, per-category
scoring with worked examples, the run's settings per backend, and the eval record."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from learner import evaluation
from learner.algo import sigma_schedule
from services import shapes_world
from services.config import ConfigError, load_config
from tests.unit.test_trainer_inprocess import small_policy

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- prompts


def test_heldout_prompts_are_balanced_fixed_and_in_split():
    prompts = evaluation.heldout_prompts(per_category=6, seed=3)
    assert prompts == evaluation.heldout_prompts(per_category=6, seed=3)
    assert prompts != evaluation.heldout_prompts(per_category=6, seed=4)  # a fresh set per seed
    assert [shapes_world.category(p) for p in prompts] == [c for c in shapes_world.CATEGORIES for _ in range(6)]
    assert all(shapes_world.is_heldout(p) for p in prompts)
    single = prompts[:6]  # the held-out single pool has 4 prompts: all of them, then repeats
    assert set(single) == set(shapes_world.all_prompts("heldout", ("single",)))


def test_the_eval_tool_draws_train_split_prompts_on_request(tmp_path):
    from learner.tools.eval import eval_prompt_list, parse_args

    cfg = load_config([], ["model.backend=tiny"])
    train = eval_prompt_list(cfg, None, 6, 501, "train")
    assert train == evaluation.shapes_prompts("train", 6, 501) != eval_prompt_list(cfg, None, 6, 501)
    assert set(train) <= set(shapes_world.all_prompts("train")) and not any(map(shapes_world.is_heldout, train))
    assert [shapes_world.category(p) for p in train] == [c for c in shapes_world.CATEGORIES for _ in range(6)]
    assert eval_prompt_list(cfg, None, 6, 501) == evaluation.heldout_prompts(6, 501)  # the default split
    with pytest.raises(ConfigError, match="--split must be one of"):
        eval_prompt_list(cfg, None, 6, 501, "test")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ConfigError, match="tiny backend without --prompts-file"):
        eval_prompt_list(cfg, str(prompts), 6, 501, "train")
    assert parse_args(["--base", "--split", "train"]).split == "train"


def test_the_eval_tool_defaults_to_a_real_runs_own_evaluation(tmp_path):
    """sd3 / flux without --prompts-file or --seed: the run's first run.eval_prompts lines at run.eval_seed, the
    in-run evaluation (it was the whole file at seed 0); an explicit file is read whole, an explicit seed wins."""
    from learner.tools.eval import default_seed, eval_prompt_list, parse_args

    lines = [f"a photo of {n} cats" for n in range(5)]
    (tmp_path / "eval.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config([], ["model.backend=sd3", "model.path=/models/sd3", "run.eval_prompts=2", "run.eval_seed=77",
                           f"run.eval_prompts_file={tmp_path / 'eval.txt'}"])
    assert eval_prompt_list(cfg, None, 16, 0) == lines[:2] == evaluation.run_prompts(cfg)
    assert eval_prompt_list(cfg, str(tmp_path / "eval.txt"), 16, 0) == lines
    assert default_seed(cfg, parse_args(["--base"]).seed) == 77 and default_seed(cfg, 5) == 5
    assert default_seed(load_config([], []), None) == 0  # tiny: a fresh held-out draw, as documented


def test_run_prompts_per_backend(tmp_path):
    cfg = load_config([], ["run.eval_prompts=8", "run.eval_seed=5"])
    assert evaluation.run_prompts(cfg) == evaluation.heldout_prompts(2, 5)
    f = tmp_path / "eval.txt"
    f.write_text("a cat\na dog\n# not a prompt\na fish\n")
    sd3 = load_config([], ["model.backend=sd3", f"model.path={tmp_path}", "model.height=64", "model.width=64",
                           f"run.eval_prompts_file={f}", "run.eval_prompts=2"])
    assert evaluation.run_prompts(sd3) == ["a cat", "a dog"]
    assert evaluation.settings(sd3)["verifier"] is False and evaluation.settings(cfg)["verifier"] is True
    # the tiny backend is judged by the verifier; real models by every configured reward unless narrowed
    assert evaluation.reward_specs(cfg) == []
    assert [r.name for r in evaluation.reward_specs(sd3)] == ["shapes_reward", "shapes_verifier"]
    narrowed = sd3.model_copy(update={"run": sd3.run.model_copy(update={"eval_rewards": ["shapes_verifier"]})})
    assert [r.name for r in evaluation.reward_specs(narrowed)] == ["shapes_verifier"]


@pytest.mark.parametrize("overrides, field", [
    (["model.backend=sd3", "model.path=/m", "model.height=64", "model.width=64"], "run.eval_prompts_file"),
    (["run.eval_rewards=[pickscore]"], "run.eval_rewards"),
    (["run.eval_prompts=30"], "run.eval_prompts"),
])
def test_config_refuses_evaluations_it_cannot_run(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config([], overrides)


# ---------------------------------------------------------------------- scoring


def _image(prompt: str, seed: int = 0) -> np.ndarray:
    return shapes_world.render(prompt, np.random.default_rng(seed))


def test_scores_are_macro_averaged_over_categories_worked_example():
    """Three `single` prompts and one `counting` one: the overall score is the mean of the two category means,
    not of the four images. Images: a correct red square (score 1), a red square for 'a red circle'
    (1/(3+1) = 0.25: red but no circle, and the square is an extra), a blank (0), one of two green triangles (2/3)."""
    prompts = ["a red square", "a red circle", "a green circle", "two green triangles"]
    images = np.stack([_image("a red square"), _image("a red square"), np.zeros((32, 32, 3), np.uint8),
                       _image("a green triangle")])
    r = evaluation.score_images(prompts, images, verifier=True)
    assert r["columns"] == ["verifier_score", "verifier_strict"]
    np.testing.assert_allclose(r["scores"]["verifier_score"], [1.0, 0.25, 0.0, 2 / 3])
    assert r["per_category"]["single"] == pytest.approx({"n": 3, "verifier_score": 1.25 / 3, "verifier_strict": 1 / 3})
    assert r["per_category"]["counting"] == pytest.approx({"n": 1, "verifier_score": 2 / 3, "verifier_strict": 0.0})
    assert r["overall"]["verifier_score"] == pytest.approx((1.25 / 3 + 2 / 3) / 2)  # not 1.9167 / 4
    assert list(r["per_category"]) == ["single", "counting"]  # the world's category order


def test_reward_columns_without_the_verifier_form_one_group():
    calls = []

    def brightness(images, prompts):
        calls.append(len(prompts))
        return images.reshape(len(images), -1).mean(1) / 255.0

    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 51, 102, 255, 204)])
    r = evaluation.score_images(["x"] * 5, images, verifier=False, rewards={"bright": brightness}, batch_size=2)
    assert calls == [2, 2, 1] and r["columns"] == ["bright"] and list(r["per_category"]) == ["all"]
    assert r["overall"]["bright"] == pytest.approx(np.mean([0, 0.2, 0.4, 1.0, 0.8]))
    with pytest.raises(ValueError, match="nothing to score"):
        evaluation.score_images(["x"], images[:1], verifier=False)
    with pytest.raises(ValueError, match="returned"):  # a reward that drops a score is an error, not a silent mean
        evaluation.score_images(["x"] * 2, images[:2], verifier=False, rewards={"b": lambda im, p: np.ones(1)})


def test_eval_record_and_headline():
    prompts = ["a red square", "two green triangles"]
    r = evaluation.score_images(prompts, np.stack([_image(p) for p in prompts]), verifier=True,
                                rewards={"const": lambda im, p: np.full(len(p), 0.5)})
    rec = evaluation.eval_record(7, r)
    assert rec["eval_columns"] == ["verifier_score", "verifier_strict", "const"]
    assert rec["eval_verifier_score"] == 1.0 and rec["eval_const"] == 0.5 and rec["eval_num_prompts"] == 2
    assert rec["eval_single_score"] == 1.0 and rec["eval_counting_score"] == 1.0
    assert evaluation.headline(r) == "verifier_score"
    plain = evaluation.score_images(["a"], np.zeros((1, 8, 8, 3), np.uint8), verifier=False,
                                    rewards={"pickscore": lambda im, p: np.ones(len(p))})
    assert evaluation.headline(plain) == "pickscore" and "eval_all_score" not in evaluation.eval_record(0, plain)


def test_standard_error_of_the_macro_mean_worked_example():
    """Two categories: single [1, 0.25, 0] (sample var 0.27083…, n 3), counting [2/3, 0] (var 2/9, n 2):
    SE = sqrt(0.27083/3 + 0.22222/2) / 2 = 0.22438…; a one-image category adds nothing."""
    prompts = ["a red square", "a red circle", "a green circle", "two green triangles", "three red circles"]
    images = np.stack([_image("a red square"), _image("a red square"), np.zeros((32, 32, 3), np.uint8),
                       _image("a green triangle"), np.zeros((32, 32, 3), np.uint8)])
    r = evaluation.score_images(prompts, images, verifier=True)
    np.testing.assert_allclose(r["scores"]["verifier_score"], [1.0, 0.25, 0.0, 2 / 3, 0.0])
    single, counting = np.array([1.0, 0.25, 0.0]), np.array([2 / 3, 0.0])
    expected = np.sqrt(single.var(ddof=1) / 3 + counting.var(ddof=1) / 2) / 2
    assert r["stderr"]["verifier_score"] == pytest.approx(expected) == pytest.approx(0.224382, abs=1e-6)
    assert evaluation.macro_stderr(np.array([0.3, 1.0, 0.5]), [[0], [1, 2]]) == pytest.approx(
        np.sqrt(np.var([1.0, 0.5], ddof=1) / 2) / 2)
    rec = evaluation.eval_record(0, r)
    assert rec["eval_verifier_score_se"] == pytest.approx(expected)


def test_sharded_evaluation_is_the_single_process_one():
    """k workers each sample a contiguous part with the noise its positions get in the whole set: combined, the
    scores, the standard errors and the grid are those of one process, whatever k."""
    policy = small_policy(seed=0)
    prompts = evaluation.heldout_prompts(3, 5)  # 12 prompts
    kw = dict(num_steps=4, shift=3.0, seed=9, verifier=True)
    whole = evaluation.evaluate(policy, prompts, grid=5, **kw)
    for k in (2, 3, 5):
        parts = [evaluation.evaluate_shard(policy, prompts, b, grid=5, **kw)
                 for b in reversed(evaluation.shards(len(prompts), k))]  # any order
        merged = evaluation.combine(prompts, parts, verifier=True, grid=5, num_steps=4, shift=3.0, seed=9,
                                    hybrid_fraction=1.0)
        assert merged["scores"] == whole["scores"] and merged["overall"] == whole["overall"]
        assert merged["stderr"] == whole["stderr"] and merged["prompts"] == whole["prompts"]
        np.testing.assert_array_equal(merged["grid"]["images"], whole["grid"]["images"])
        assert merged["grid"]["scores"] == whole["grid"]["scores"]
    assert evaluation.shards(10, 3) == [(0, 3), (3, 6), (6, 10)] and evaluation.shards(2, 5) == [(0, 1), (1, 2)]
    part = evaluation.evaluate_shard(policy, prompts, (0, 6), **kw)
    with pytest.raises(ValueError, match="cover"):  # half the set is not an evaluation
        evaluation.combine(prompts, [part], verifier=True)
    with pytest.raises(ValueError, match="cover"):  # nor is a part counted twice
        evaluation.combine(prompts, [part, part, evaluation.evaluate_shard(policy, prompts, (6, 12), **kw)],
                           verifier=True)
    with pytest.raises(ValueError, match="non-empty part"):
        evaluation.evaluate_shard(policy, prompts, (6, 6), **kw)


def test_the_printed_change_carries_the_standard_error_of_the_difference():
    from learner.outputs.metrics import eval_change, eval_summary

    base = {"iteration": -1, "eval_columns": ["verifier_score"], "eval_verifier_score": 0.48,
            "eval_verifier_score_se": 0.006}
    final = {"iteration": 59, "eval_columns": ["verifier_score"], "eval_verifier_score": 0.59,
             "eval_verifier_score_se": 0.008}
    assert eval_summary(final) == "verifier_score=0.590±0.008"
    assert eval_change(base, final) == "verifier_score 0.480 → 0.590, change +0.110 ± 0.010"  # sqrt(.006² + .008²)
    assert eval_change(None, final) == "" and eval_change(base, base) == ""
    old = {k: v for k, v in final.items() if not k.endswith("_se")}  # records written before the standard error
    assert eval_summary(old) == "verifier_score=0.590" and eval_change(base, old).endswith("change +0.110")


def test_grid_indices_span_the_set():
    assert evaluation.grid_indices(192, 16) == list(range(0, 192, 12))  # 4 cells per category of 48
    assert evaluation.grid_indices(5, 16) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------- sampling


def test_sampler_is_independent_of_batch_size_and_hybrid_switches_models():
    trained, base = small_policy(seed=0), small_policy(seed=1)
    prompts = evaluation.heldout_prompts(1, 0)
    kw = dict(num_steps=6, shift=3.0, seed=3)
    t_img = evaluation.sample_images(trained, prompts, batch_size=3, **kw)
    assert np.array_equal(t_img, evaluation.sample_images(trained, prompts, batch_size=4, **kw))
    b_img = evaluation.sample_images(base, prompts, **kw)
    assert not np.array_equal(t_img, b_img)
    assert np.array_equal(evaluation.sample_images(trained, prompts, base=base, fraction=1.0, **kw), t_img)
    assert np.array_equal(evaluation.sample_images(trained, prompts, base=base, fraction=0.0, **kw), b_img)
    half = evaluation.sample_images(trained, prompts, base=base, fraction=0.5, **kw)
    # independently: Euler with `trained` on σ_0…σ_3, then `base` on σ_3…σ_6, from the same seeded noise
    x = evaluation.initial_noise(trained.latent_shape, len(prompts), 3)
    sig = sigma_schedule(6, 3.0)
    with torch.no_grad():
        for i in range(6):
            model = trained if i < 3 else base
            s = torch.full((len(prompts),), float(sig[i]))
            x = x - (sig[i] - sig[i + 1]) * model.velocity(x, s, model.encode_prompts(prompts))
    np.testing.assert_array_equal(half, trained.decode(x))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        evaluation.sample_images(trained, prompts, base=base, fraction=1.5, **kw)
    with pytest.raises(ValueError, match="needs the base"):
        evaluation.sample_images(trained, prompts, fraction=0.5, **kw)


def test_evaluate_shipped_policy_is_bounded_deterministic_and_beats_noise(shipped):
    prompts = evaluation.heldout_prompts(per_category=4, seed=0)
    a = evaluation.evaluate(shipped, prompts, num_steps=12, shift=3.0, seed=0, verifier=True, grid=4, batch_size=5)
    b = evaluation.evaluate(shipped, prompts, num_steps=12, shift=3.0, seed=0, verifier=True, grid=4)
    assert set(a["per_category"]) == set(shapes_world.CATEGORIES)
    assert all(0.0 <= v <= 1.0 for v in a["overall"].values())
    assert a["overall"] == b["overall"] and a["scores"] == b["scores"]  # noise drawn once per call
    assert a["grid"]["prompts"] == [prompts[i] for i in (0, 4, 8, 12)]  # one cell per category
    assert a["grid"]["scores"] == [a["scores"]["verifier_score"][i] for i in (0, 4, 8, 12)]
    noise = evaluation.initial_noise(shipped.latent_shape, len(prompts), 0)
    chance = evaluation.score_images(prompts, shipped.decode(noise), verifier=True)
    # Pure noise scores ~0.17 (random palette-coloured blobs earn colour and shape points); the shipped policy
    # ~0.4 on this set (0.50 on the README's 32 per category with 25 steps).
    assert a["overall"]["verifier_score"] > chance["overall"]["verifier_score"] + 0.1


def test_requirement_rates_worked_example():
    """Rows [objects, colour, shape, count, relation, extras, found, asked, drawn] → per category: colour / shape /
    count over required objects, relation over the prompts that have one, extras and objects per image; "all" pools
    them. The confusion counts the single prompts' (asked, drawn) shapes."""
    prompts = ["a red circle", "a blue square", "a red circle left of a blue square"]
    circle, square, triangle = (shapes_world.SHAPES.index(s) for s in ("circle", "square", "triangle"))
    rows = [[1, 1, 0, 0, -1, 1, 1, circle, triangle], [1, 1, 1, 1, -1, 0, 1, square, square],
            [2, 2, 1, 0, 0, 2, 3, -1, -1]]
    r = evaluation.requirement_rates(prompts, rows)
    assert list(r) == ["single", "position", "all"]
    assert r["single"] == pytest.approx({"n": 2, "colour": 1.0, "shape": 0.5, "count": 0.5, "extras": 0.5,
                                         "objects": 1.0})  # no relation key: no single prompt has one
    assert r["position"] == pytest.approx({"n": 1, "colour": 1.0, "shape": 0.5, "count": 0.0, "relation": 0.0,
                                           "extras": 2.0, "objects": 3.0})
    assert r["all"] == pytest.approx({"n": 3, "colour": 4 / 4, "shape": 2 / 4, "count": 1 / 4, "relation": 0.0,
                                      "extras": 1.0, "objects": 5 / 3})
    conf = evaluation.shape_confusion(rows + [[1, 0, 0, 0, -1, 0, 0, circle, len(shapes_world.SHAPES)]])
    assert conf["circle"] == {"circle": 0, "square": 0, "triangle": 1, "none": 1, "several": 0}
    assert conf["square"]["square"] == 1 and sum(conf["triangle"].values()) == 0
    table = evaluation.requirements_table({"held-out": {"requirements": r, "shape_confusion": conf}})
    assert "| held-out | single | 2 | 1.000 | 0.500 | 0.500 | – | 0.500 | 1.000 |" in table
    assert "| held-out | circle | 0 | 0 | 1 | 1 | 0 |" in table


def test_headroom_worked_example():
    """The verifier score with some requirements' points granted. A red circle drawn as a red triangle (colour only,
    one extra: 1/4); a blue square drawn right (3/3); "a red circle left of a blue square" drawn as a green circle and
    a blue triangle (blue present, a circle present, no count, no relation, both extras: 2/9). Categories are
    macro-averaged: (single mean + position) / 2."""
    prompts = ["a red circle", "a blue square", "a red circle left of a blue square"]
    rows = [[1, 1, 0, 0, -1, 1, 1, -1, -1], [1, 1, 1, 1, -1, 0, 1, -1, -1], [2, 1, 1, 0, 0, 2, 2, -1, -1]]
    room = evaluation.headroom(prompts, rows)

    def macro(single_a, single_b, position):
        return ((single_a + single_b) / 2 + position) / 2

    expected = {
        "as drawn": macro(1 / 4, 1, 2 / 9),
        "every colour": macro(1 / 4, 1, 3 / 9),  # the red one's point; the circle prompt has its colour already
        "every relation": macro(1 / 4, 1, 3 / 9),  # only the position prompt has a relation
        "colour + relation": macro(1 / 4, 1, 4 / 9),
        "no extras": macro(1 / 3, 1, 2 / 7),
        "colour + relation + no extras": macro(1 / 3, 1, 4 / 7),
        "every shape": macro(2 / 4, 1, 3 / 9),
        "every count": macro(2 / 4, 1, 4 / 9),
        "shape + count": macro(3 / 4, 1, 5 / 9),
    }
    assert list(room) == [n for n, _ in evaluation.HEADROOM] == list(expected)
    assert room == pytest.approx(expected)
    table = evaluation.requirements_table({"held-out": {"requirements": evaluation.requirement_rates(prompts, rows),
                                                         "headroom": room}})
    assert f"| held-out | {room['as drawn']:.3f} | {room['every colour']:.3f} |" in table


def test_the_breakdown_survives_sharding_and_matches_the_images():
    """The requirement rates of a sharded evaluation are those of one process, and they are the verifier's counts
    on the very images the scores came from (recomputed here from the sampled images)."""
    policy = small_policy(seed=0)
    prompts = evaluation.heldout_prompts(3, 5)  # 12 prompts
    kw = dict(num_steps=4, shift=3.0, seed=9, verifier=True)
    whole = evaluation.evaluate(policy, prompts, breakdown=True, **kw)
    parts = [evaluation.evaluate_shard(policy, prompts, b, breakdown=True, **kw) for b in evaluation.shards(12, 3)]
    merged = evaluation.combine(prompts, parts, verifier=True, num_steps=4, shift=3.0, seed=9, hybrid_fraction=1.0)
    assert merged["requirements"] == whole["requirements"] and set(whole["requirements"]) == {*shapes_world.CATEGORIES,
                                                                                             "all"}
    noise = evaluation.initial_noise(policy.latent_shape, len(prompts), 9)
    images = evaluation.sample_images(policy, prompts, num_steps=4, shift=3.0, noise=noise)
    reqs = [shapes_world.requirements(p, im) for p, im in zip(prompts, images)]
    assert [r.verdict.score for r in reqs] == whole["scores"]["verifier_score"]
    objects = sum(r.objects for r in reqs)
    assert whole["requirements"]["all"]["shape"] == pytest.approx(sum(r.shape for r in reqs) / objects)
    assert whole["requirements"]["all"]["objects"] == pytest.approx(np.mean([r.found for r in reqs]))
    drawn = {}  # the confusion recomputed: the shape of the one object in the asked colour, per single prompt
    for p, im in zip(prompts, images):
        spec = shapes_world.parse(p)
        if spec.category == "single":
            mine = [d.shape for d in shapes_world.detect(im) if d.color == spec.objects[0][0]]
            key = (spec.objects[0][1], mine[0] if len(mine) == 1 else "none" if not mine else "several")
            drawn[key] = drawn.get(key, 0) + 1
    assert {(a, d): k for a, row in whole["shape_confusion"].items() for d, k in row.items() if k} == drawn
    # the headroom through the verifier's own verdict: the requirements granted on its Requirements, then re-scored
    cats = [shapes_world.category(p) for p in prompts]

    def granted(r, **kw):
        return dataclasses.replace(r, **kw).verdict.score

    for name, fn in [("as drawn", lambda r: r.verdict.score),
                     ("colour + relation", lambda r: granted(r, colour=r.objects,
                                                             relation=None if r.relation is None else True)),
                     ("no extras", lambda r: granted(r, extras=0)),
                     ("shape + count", lambda r: granted(r, shape=r.objects, count=r.objects))]:
        per_image = np.array([fn(r) for r in reqs])
        macro = np.mean([per_image[[i for i, c in enumerate(cats) if c == cat]].mean() for cat in dict.fromkeys(cats)])
        assert whole["headroom"][name] == pytest.approx(macro), name
    assert whole["headroom"]["as drawn"] == pytest.approx(whole["overall"]["verifier_score"])
    assert "requirements" not in evaluation.evaluate(policy, prompts, **kw)  # only on request
    with pytest.raises(ValueError, match="shapes verifier"):
        evaluation.evaluate_shard(policy, prompts, (0, 4), num_steps=4, shift=3.0, seed=9, verifier=False,
                                  rewards={"const": lambda ims, ps: np.ones(len(ims))}, breakdown=True)
