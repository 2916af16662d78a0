"""benchmarks/experiments/matching_screen.py, the three matching-objective levers screened for issue 17: the pairwise
preference loss on a worked example, the positive and shuffled weights, the DPO variant at the reference (log 2), and
that every patch is undone."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.experiments.matching_screen import install, pairwise_preference_loss
from learner.algo.family import awm_loss
from learner.training import objectives, updates
from learner.training.objectives import MatchingSpec
from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = MatchingSpec(kind="awm", weighting="uniform", times=3, num_steps=8, shift=3.0)


def nlsig(x: float) -> float:
    return math.log1p(math.exp(-x))  # −log σ(x)


def test_pairwise_preference_loss_worked_example():
    r = torch.tensor([0.0, 0.1, -0.1, 5.0])
    adv = torch.tensor([1.0, 0.0, -1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1])  # row 3 is alone in its group: no pair
    # pairs (0,1) w 1, β·Δr = −1; (0,2) w 2, +1; (1,2) w 1, +2
    expected = (1 * nlsig(-1.0) + 2 * nlsig(1.0) + 1 * nlsig(2.0)) / 4
    assert float(pairwise_preference_loss(r, adv, groups, beta=10.0)) == pytest.approx(expected, rel=1e-6)
    assert float(pairwise_preference_loss(r, torch.zeros(4), groups, beta=10.0)) == 0.0  # no preference
    # at r = 0 (the model is the reference) every pair costs log 2
    assert float(pairwise_preference_loss(torch.zeros(4), adv, groups, beta=10.0)) == pytest.approx(math.log(2))


def _weight_grad(adv: torch.Tensor, t: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """d loss / d err of the (patched) awm_loss: with uniform weighting, the row's Ā / B (awm_loss's value is −mean Ā
    whatever the errors, so the weights show in the gradient)."""
    err = err.clone().requires_grad_(True)
    objectives.awm_loss(err, t, adv, weighting="uniform").backward()
    return err.grad


def test_positive_and_shuffled_weights_and_restore():
    gen = torch.Generator().manual_seed(0)
    err, t, adv = torch.rand(12, generator=gen), torch.rand(12, generator=gen), torch.randn(12, generator=gen)
    assert (adv < 0).any() and (adv > 0).any()
    torch.testing.assert_close(_weight_grad(adv, t, err), adv.clamp(-5, 5) / 5 / 12)  # plain AWM first
    state = install("positive")
    try:
        torch.testing.assert_close(_weight_grad(adv, t, err), adv.clamp(min=0) / 5 / 12)
    finally:
        state["restore"]()
    assert objectives.awm_loss is awm_loss
    state = install("shuffled", seed=5)
    try:
        got = _weight_grad(adv, t, err)
    finally:
        state["restore"]()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, adv[perm].clamp(min=0) / 5 / 12)
    assert not torch.equal(got, adv.clamp(min=0) / 5 / 12)
    with pytest.raises(ValueError, match="unknown variant"):
        install("negative")


def test_dpo_at_the_reference_costs_log_2_and_moves_the_weights():
    batch = make_worker(small_policy(), keep_final=True).rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3])  # 4 groups of 4
    plain = updates.matching_micro_loss
    state = install("dpo", beta=100.0)
    try:
        learner = make_learner(small_policy(), objective="awm", matching=SPEC, kl_beta=1e-12, micro_batch_size=8)
        adv = learner.advantages(batch)
        rows = torch.arange(8)  # two groups
        cond = {k: v.repeat_interleave(4, 0) for k, v in batch.cond.items()}  # per row
        loss, m = learner._micro_step(batch, cond, rows, [0, 1, 2], adv, (0, 0, 0))
        assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # θ = reference: every implicit reward is 0
        assert m["forward_rows"] == 8 * 3
        # a small step down its gradient lowers it: the model comes to prefer the better members
        loss.backward()
        params = learner.policy.trainable_parameters()
        norm = torch.sqrt(sum((q.grad ** 2).sum() for q in params))
        assert float(norm) > 0
        with torch.no_grad():
            for q in params:
                q -= 1e-3 * q.grad / norm
        loss2, _ = learner._micro_step(batch, cond, rows, [0, 1, 2], adv, (0, 0, 0))
        assert float(loss2.detach()) < math.log(2) - 1e-6
    finally:
        state["restore"]()
    assert updates.matching_micro_loss is plain
