"""Can the in-run evaluation be trusted? On a small version of it (the shipped base, 64 balanced held-out prompts,
8 ODE steps):

- its standard error is honest: the base scored on six fresh sets spreads as the reported standard error says;
- the two controls stay within the uncertainty it reports for a change: weight noise the size of a run's update,
  and a short run on uniform random rewards, do not show up as a gain.

The first is what makes the printed `± se` mean something; the second is what the old 192-prompt in-run set
failed (weight noise alone scored +0.03 on it): a change that is only the set's luck being redrawn.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from benchmarks.reward_control import random_rewards
from learner import evaluation
from learner.driver.inprocess import run_inprocess
from services.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

PER_CATEGORY, STEPS = 16, 8


def _score(policy, seed: int) -> tuple[float, float]:
    r = evaluation.evaluate(policy, evaluation.heldout_prompts(PER_CATEGORY, seed), num_steps=STEPS, shift=3.0,
                            seed=seed, verifier=True)
    return r["overall"]["verifier_score"], r["stderr"]["verifier_score"]


def test_the_standard_error_matches_the_spread_of_fresh_sets(shipped):
    scored = [_score(shipped, seed) for seed in range(11, 17)]
    spread = statistics.stdev(s for s, _ in scored)
    se = statistics.mean(e for _, e in scored)
    # sd of 6 draws has a relative standard error of ~30 %; a wrong formula (the SE of one category, of the
    # plain mean over a quarter of the images, or no √n) lands outside [0.5, 2]×
    assert 0.5 * se < spread < 2.0 * se, (spread, se)
    assert 0.02 < se < 0.06  # 64 images of a score with per-image sd ≈ 0.3


def test_weight_noise_and_random_rewards_do_not_show_up_as_a_gain(shipped):
    base, base_se = _score(shipped, 1234)
    # weight noise of a run's size: Adam moves each weight by about lr·sqrt(steps) as a random walk (3e-5 · √240)
    state = {k: v.clone() for k, v in shipped.trainable_state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    try:
        shipped.load_trainable_state_dict({k: v + 4.6e-4 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                                           else v for k, v in state.items()})
        moved = sum(float((a - b).norm() ** 2) for a, b in zip(shipped.trainable_state_dict().values(),
                                                               state.values())) ** 0.5
        assert moved > 0.1  # the noise did reach the weights
        noise_score, noise_se = _score(shipped, 1234)
    finally:
        shipped.load_trainable_state_dict(state)
    assert abs(noise_score - base) < 2 * (base_se ** 2 + noise_se ** 2) ** 0.5, (base, noise_score)

    cfg = load_config([], ["run.iterations=3", "run.eval_every=0", "rollout.batch_size=16", "grpo.group_size=4",
                           "learner.micro_batch_size=8", "run.seed=5"])
    _, _, learner = run_inprocess(cfg, random_rewards([r.name for r in cfg.reward.rewards], 3))
    random_score, random_se = _score(learner.policy, 1234)
    assert not np.isclose(random_score, base)  # the random walk changed the images
    assert random_score - base < 2 * (base_se ** 2 + random_se ** 2) ** 0.5, (base, random_score)
