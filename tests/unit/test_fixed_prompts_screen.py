"""benchmarks/experiments/fixed_prompts_screen.py, issue 17's over-fitting check: the run trains on the fixed
train-split prompts only, and scores them from their own noise, from other noises, and fresh sets."""

from __future__ import annotations

import pytest

from benchmarks.experiments.fixed_prompts_screen import main, run
from services import shapes_world
from services.prompts import PromptSource

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("sampler.num_steps=4", "window.size=2", "rollout.batch_size=8", "grpo.group_size=4", "learner.micro_batch_size=4",
         "learner.gradient_accumulation_steps=2", "grpo.matching_times=1")


def test_trains_on_the_fixed_prompts_and_scores_them_three_ways(tmp_path):
    from learner import evaluation
    from learner.evaluation.prompts import shapes_prompts
    from learner.tools.eval import load_models
    from services.config import load_config

    lines = []
    result = run(1, 2, 1, seed=3, prompt_seed=11, noise_seeds=(5,), sets=1, fresh_per_category=1, overrides=SMALL,
                 workdir=str(tmp_path), log=lines.append)
    prompts = result["prompts"]
    assert prompts == shapes_prompts("train", 1, 11) and len(prompts) == 4
    assert not any(shapes_world.is_heldout(p) for p in prompts)
    assert (tmp_path / "prompts.txt").read_text().split("\n")[:-1] == prompts
    source = PromptSource("file", 3, str(tmp_path / "prompts.txt"), shapes_grammar=True)
    assert {p for i in range(2) for p in source.for_iteration(i, 2)} <= set(prompts)  # what the rollouts drew from
    assert [r["iterations"] for r in result["curve"]] == [0, 1, 2] and len(lines) == 5  # 3 scorings, 2 intervals
    assert lines[3].startswith("iterations 1-1: training rollouts") and lines[4].startswith("iterations 2-2:")
    for r in result["curve"]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("own_noise", "other_noise", "fresh"))
    # iteration 0 is the base: the same numbers as the evaluation of the shipped policy
    cfg = load_config(["tiny_cpu"], list(SMALL))
    policy, _ = load_models(cfg, None, need_base=False)
    base = evaluation.evaluate(policy, prompts, num_steps=4, shift=cfg.sampler.shift, seed=5, verifier=True)
    assert result["curve"][0]["other_noise"] == pytest.approx(base["overall"]["verifier_score"], abs=1e-12)


def test_a_few_prompts_scored_repeatedly_and_the_training_rewards_per_interval(tmp_path):
    from learner import evaluation
    from learner.evaluation.prompts import shapes_prompts
    from learner.tools.eval import load_models
    from services.config import load_config

    result = run(1, 3, 2, seed=3, prompt_seed=11, noise_seeds=(5,), sets=0, num_prompts=2, repeats=3,
                 overrides=SMALL, workdir=str(tmp_path), log=lambda _: None)
    assert result["prompts"] == shapes_prompts("train", 1, 11)[:2]  # single, counting
    assert [r["iterations"] for r in result["curve"]] == [0, 2, 3]
    assert all(r["fresh"] is None for r in result["curve"]) and result["curve"][0]["train_reward"] == {}
    # each interval's training reward is the mean of the learner's per-iteration means over that interval
    means = result["reward_means"]
    assert len(means) == 3
    for row, its in ((result["curve"][1], means[0:2]), (result["curve"][2], means[2:3])):
        assert set(row["train_reward"]) == set(its[0])
        for name, v in row["train_reward"].items():
            assert v == pytest.approx(sum(m[name] for m in its) / len(its), abs=1e-6)
    # the trained prompts are scored three times each, every copy its own noise
    cfg = load_config(["tiny_cpu"], list(SMALL))
    policy, _ = load_models(cfg, None, need_base=False)
    scored = [p for p in result["prompts"] for _ in range(3)]
    base = evaluation.evaluate(policy, scored, num_steps=4, shift=cfg.sampler.shift, seed=5, verifier=True)
    assert result["curve"][0]["other_noise"] == pytest.approx(base["overall"]["verifier_score"], abs=1e-12)
    with pytest.raises(ValueError, match="repeats"):
        run(1, 1, 1, seed=3, repeats=0, overrides=SMALL, workdir=str(tmp_path), log=lambda _: None)


def test_cli_refuses_a_zero_interval():
    with pytest.raises(SystemExit):
        main(["--eval-every", "0"])
