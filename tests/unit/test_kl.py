"""The KL penalty to the reference policy (`grpo.kl_beta`): the formula against torch.distributions, the reference
(adapter off for LoRA, a frozen copy of the starting transformer otherwise), and its place in the learner's loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from learner.algo import kl_penalty, sde_mean_std
from reward_servers.client import LocalRewards
from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_penalty_is_the_gaussian_kl_averaged_over_elements():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.5, 1.2]).view(3, 1, 1, 1)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).flatten(1).mean(1)
    torch.testing.assert_close(kl_penalty(mean, ref, std), expected)
    # worked example: means 0.2 apart everywhere, std 0.1 → 0.2² / (2·0.01) = 2.0 per element
    torch.testing.assert_close(kl_penalty(torch.full((1, 5), 0.2), torch.zeros(1, 5), torch.tensor(0.1)),
                               torch.tensor([2.0]))
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(mean, ref[:2], std)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reference_velocity_is_the_starting_model(lora_rank):
    policy, start = small_policy(), small_policy()
    if lora_rank:
        policy = type(policy)(policy.config, policy.transformer, policy.text_encoder, lora_rank=lora_rank)
    policy.keep_reference()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.8, 0.3])
    cond = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        assert not torch.allclose(policy.velocity(x, sigma, cond), start.velocity(x, sigma, cond))
        torch.testing.assert_close(policy.reference_velocity(x, sigma, cond), start.velocity(x, sigma, cond))
        if lora_rank:  # the adapter is back on afterwards
            assert not torch.allclose(policy.velocity(x, sigma, cond), start.velocity(x, sigma, cond))


def test_the_learner_adds_beta_times_the_kl_of_the_trained_transitions():
    policy = small_policy()
    learner, worker = make_learner(policy, kl_beta=0.5, gradient_accumulation_steps=1, micro_batch_size=8,
                                   lr=3e-3), make_worker(small_policy())
    start = copy.deepcopy(policy)
    batch = worker.rollout(0, (1, 3), PROMPTS, [0, 1, 2, 3])
    first = learner.update(batch)
    assert first["kl"] < 1e-3  # the first micro-batch is at the reference itself; later ones moved a little
    worker.sync_weights(learner.get_weights())
    batch = worker.rollout(1, (1, 3), PROMPTS, [0, 1, 2, 3])
    # independently: the KL of every trained transition between the current weights and the start
    with torch.no_grad():
        x, x_next = batch.latents.flatten(0, 1), batch.next_latents.flatten(0, 1)
        sig, sig_next = batch.sigmas.repeat(batch.num_rows), batch.sigmas_next.repeat(batch.num_rows)
        cond = {k: v.repeat_interleave(batch.group_size * 3, 0) for k, v in batch.cond.items()}
        means = [sde_mean_std(x, m.velocity(x, sig, cond), sig, sig_next, eta=0.7)[0] for m in (policy, start)]
        std = sde_mean_std(x, means[0], sig, sig_next, eta=0.7)[1].expand_as(x)  # (B, C, H, W)
        expected = kl_divergence(Normal(means[0], std), Normal(means[1], std)).flatten(1).mean(1).mean()
    assert float(expected) > 1e-6 and x_next.shape == x.shape
    # the first micro-batch of the update runs before any optimizer step: its KL is the one computed here
    learner.optimizer.param_groups[0]["lr"] = 0.0  # so that every micro-batch sees the same weights
    stats = learner.update(batch)
    assert stats["kl"] == pytest.approx(float(expected), rel=1e-4)


def test_with_zero_advantages_only_the_kl_moves_the_weights():
    """Equal rewards in every group: GRPO's gradient is 0, so an update moves the weights only through β·KL, which
    is 0 at the reference and not after the weights moved away from it."""
    policy = small_policy()
    learner, worker = make_learner(policy, kl_beta=1.0, lr=1e-3), make_worker(small_policy())
    worker.rewards = LocalRewards({"verifier": lambda images, prompts: np.ones(len(prompts))})
    at_start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    learner.update(worker.rollout(0, (1, 3), PROMPTS, [0, 1, 2, 3]))
    assert all(torch.equal(at_start[k], v) for k, v in policy.trainable_state_dict().items())
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    moved = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    stats = learner.update(worker.rollout(1, (1, 3), PROMPTS, [0, 1, 2, 3]))
    assert stats["kl"] > 0 and stats["adv_abs_mean"] == 0.0
    assert any(not torch.equal(moved[k], v) for k, v in policy.trainable_state_dict().items())


def test_kl_beta_zero_keeps_no_reference_and_refuses_negative():
    policy = small_policy()
    make_learner(policy)
    assert policy.trainable._reference is None
    with pytest.raises(ValueError, match="kl_beta"):
        make_learner(small_policy(), kl_beta=-1.0)
