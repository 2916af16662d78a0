"""The window's first step is computed once per group, in the rollout (batch P) and in the learner (the members of a
micro-batch share one forward); the samples, losses and gradients are those of the unshared computation."""

from __future__ import annotations

import pytest
import torch

from learner.algo import Stream, seeded_generator
from learner.algo.sampler import sample_mixed
from learner.algo.schedule import sigma_schedule
from learner.algo.transitions import ode_step, sde_step
from learner.algo.window import Window
from learner.training import sharing
from learner.training.sharing import shared_inputs, shared_velocity, update_order
from services.config import load_config
from tests.unit.test_trainer_inprocess import PROMPTS, G, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the update order
def test_by_group_order_keeps_each_group_together_and_is_seeded():
    gen = lambda: seeded_generator(3, Stream.UPDATE_ORDER, 5, 0)  # noqa: E731
    order = update_order(12, 4, gen(), "by_group")
    assert sorted(order.tolist()) == list(range(12))
    blocks = order.view(3, 4)
    for block in blocks:  # each block is one whole group, its rows in batch order
        assert block.tolist() == list(range(int(block[0]), int(block[0]) + 4)) and int(block[0]) % 4 == 0
    assert torch.equal(order, update_order(12, 4, gen(), "by_group"))
    assert torch.equal(update_order(12, 4, gen(), "shuffled"), torch.randperm(12, generator=gen()))
    with pytest.raises(ValueError, match="whole groups"):
        update_order(10, 4, gen(), "by_group")
    with pytest.raises(ValueError, match="unknown update order"):
        update_order(12, 4, gen(), "sorted")


# ------------------------------------------------------------------------------ which inputs are shared
def test_shared_inputs_worked_example():
    a, b = torch.zeros(2, 2), torch.ones(2, 2)
    x = torch.stack([a, a, b, a, a, a])
    sigma = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 0])
    candidate = torch.tensor([True, True, True, True, True, False])
    s = shared_inputs(x, sigma, groups, candidate)
    # 1 repeats 0 (same group, σ, x); 2 differs in x; 3 in σ; 4 in group; 5 is not a candidate
    assert s.unique.tolist() == [0, 2, 3, 4, 5]
    assert s.inverse.tolist() == [0, 0, 1, 2, 3, 4]
    assert s.saved == 1


def test_shared_velocity_gives_the_unshared_values_and_gradients():
    w = torch.randn(4, 4, requires_grad=True)
    fn = lambda x, s, c: (x @ w) * s[:, None] + c["e"]  # noqa: E731
    x = torch.randn(3, 4)[[0, 0, 1, 2, 0]]
    sigma = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    cond = {"e": torch.randn(2, 4)[[0, 0, 0, 1, 0]]}
    s = shared_inputs(x, sigma, torch.tensor([0, 0, 0, 1, 0]), torch.ones(5, dtype=torch.bool))
    assert s.saved == 2
    weights = torch.arange(1.0, 6.0)[:, None]
    shared = (shared_velocity(fn, s)(x, sigma, cond) * weights).sum()
    g_shared = torch.autograd.grad(shared, w)[0]
    plain = (fn(x, sigma, cond) * weights).sum()
    g_plain = torch.autograd.grad(plain, w)[0]
    torch.testing.assert_close(shared, plain)
    torch.testing.assert_close(g_shared, g_plain)


# ------------------------------------------------------------------------------ the rollout
def test_rollout_computes_the_first_window_step_once_per_group():
    torch.manual_seed(0)
    weight = torch.randn(3, 3) * 0.3
    batches = []

    def velocity(x, sigma, cond):
        batches.append(x.shape[0])
        return torch.einsum("bchw,cd->bdhw", x, weight) * sigma.view(-1, 1, 1, 1) + cond["c"].view(-1, 1, 1, 1)

    p, g, n = 2, 3, 8
    sigmas = sigma_schedule(n, 3.0).float()
    noise, cond = torch.randn(p, 3, 4, 4), {"c": torch.tensor([0.1, -0.2])}
    xi = torch.randn(p * g, 3, 3, 4, 4)
    traj = sample_mixed(velocity, noise, cond, sigmas, Window(2, 3), group_size=g, eta=0.7, sde_noise=xi)
    assert batches == [p, p, p] + [p * g] * (n - 3)  # prefix (2) and the first window step at batch P
    assert traj.image_evals == p * 3 + p * g * (n - 3)
    # written out without sharing: every member computes every window step
    x = noise
    for i in range(2):
        x = ode_step(x, velocity(x, sigmas[i].repeat(p), cond), float(sigmas[i]), float(sigmas[i + 1]))
    x, c = x.repeat_interleave(g, 0), {"c": cond["c"].repeat_interleave(g)}
    log_probs = []
    for t, i in enumerate(range(2, 5)):
        step = sde_step(x, velocity(x, sigmas[i].repeat(p * g), c), float(sigmas[i]), float(sigmas[i + 1]),
                        eta=0.7, kind="flow", noise=xi[:, t])
        log_probs.append(step.log_prob)
        x = step.prev_sample
    for i in range(5, n):  # Euler after the window
        x = ode_step(x, velocity(x, sigmas[i].repeat(p * g), c), float(sigmas[i]), float(sigmas[i + 1]))
    torch.testing.assert_close(traj.log_probs, torch.stack(log_probs, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traj.final, x, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the learner
@pytest.fixture(scope="module")
def batch():
    return make_worker(small_policy()).rollout(0, (1, 3), PROMPTS, [0, 1, 2, 3])  # 4 groups of G = 4, window 3


def _no_sharing(x, sigma, groups, candidate):
    n = len(x)
    return sharing.Sharing(unique=torch.arange(n), inverse=torch.arange(n))


@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_shared_gradient_equals_the_unshared_one(batch, monkeypatch, kl_beta):
    """policy_gradient takes the rows in batch order, 4 per micro-batch: one group each, so the first window step
    is one forward per micro-batch instead of 4; the gradient is the one of computing every row."""
    shared = make_learner(small_policy(), kl_beta=kl_beta).policy_gradient(batch)
    monkeypatch.setattr("learner.training.updates.shared_inputs", _no_sharing)
    plain = make_learner(small_policy(), kl_beta=kl_beta).policy_gradient(batch)
    assert float(plain.norm()) > 0
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-7)


def test_by_group_update_counts_the_rows_it_computes_and_matches_the_unshared_update(batch, monkeypatch):
    assert G == 4
    a = make_learner(small_policy(), update_order="by_group").update(batch)
    # 16 rows × 3 window steps = 48 transitions; each micro-batch of 4 is one group: 3 of its 4 first steps shared
    assert a["trained_sample_steps"] == 48 and a["forward_rows"] == 48 - 4 * 3
    assert a["first_ratio_dev"] < 1e-6
    monkeypatch.setattr("learner.training.updates.shared_inputs", _no_sharing)
    b = make_learner(small_policy(), update_order="by_group").update(batch)
    assert b["forward_rows"] == 48
    for k in ("loss", "ratio_mean", "ratio_min", "ratio_max", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k


def test_shuffled_order_shares_only_what_meets_in_a_micro_batch(batch):
    stats = make_learner(small_policy(), update_order="shuffled").update(batch)
    order = torch.randperm(16, generator=seeded_generator(3, Stream.UPDATE_ORDER, 0, 0))
    expected = sum(4 * 3 - (4 - len({int(r) // G for r in order[lo:lo + 4]})) for lo in range(0, 16, 4))
    assert stats["forward_rows"] == expected


def test_rows_that_differ_at_the_first_step_are_not_shared(batch):
    """The structure says members share x_l; the check says whether they do (a batch whose rows were perturbed)."""
    perturbed = batch.to("cpu")
    perturbed.latents = perturbed.latents.clone()
    perturbed.latents[1::2, 0] += 1e-3  # odd members start elsewhere
    stats = make_learner(small_policy(), update_order="by_group").update(perturbed)
    # per group only member 2 equals the first member (1 and 3 equal each other, but only the first is compared)
    assert stats["forward_rows"] == 48 - 4 * 1


def test_update_order_config_default_and_refusal():
    assert load_config([], []).learner.update_order == "by_group"
    with pytest.raises(Exception, match="update_order"):
        load_config([], ["learner.update_order=sorted"])
    with pytest.raises(ValueError, match="update_order"):
        make_learner(small_policy(), update_order="sorted")


def test_bad_window_noise_is_refused_before_any_model_evaluation():
    calls = []

    def velocity(x, sigma, cond):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    sigmas, noise = sigma_schedule(8, 3.0).float(), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"sde_noise must be shaped \(6, 3, 3, 4, 4\)"):
        sample_mixed(velocity, noise, {}, sigmas, Window(2, 3), group_size=3, eta=0.7,
                     sde_noise=torch.randn(6, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="needs sde_noise or a generator"):
        sample_mixed(velocity, noise, {}, sigmas, Window(2, 3), group_size=3, eta=0.7)
    assert calls == []  # neither the prefix nor the first window step was computed
