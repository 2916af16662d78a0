"""TempFlow-GRPO, G²RPO, AWM and DiffusionNFT math (learner/algo/family.py) on METHODS.md's worked examples and
against independent formulations (numpy, autograd of the written-out formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.algo import sde_mean_std, sigma_schedule
from learner.algo.family import (
    awm_loss,
    batch_std_advantages,
    branch_advantages,
    flow_matching_error,
    ghuber_psi,
    granularity_grid,
    integrated_advantages,
    lagged_decay,
    lagged_update,
    nft_loss,
    nft_optimality,
    noise_aware_weights,
    noised,
    stratified_indices,
    tempflow_forwards,
)


# ------------------------------------------------------------------------------------------------ TempFlow-GRPO
def test_tempflow_stds_and_noise_aware_weights_worked_example():
    """METHODS.md §1: N = 10, s = 3, η = 0.7 → s_i = [.700, .738, .532, …, .256] (s_1 > s_0: the σ = 1 rule)."""
    sig = sigma_schedule(10, 3.0)
    x = torch.zeros(1, 4)
    stds = torch.stack([torch.as_tensor(sde_mean_std(x, x, float(sig[i]), float(sig[i + 1]), eta=0.7)[1]).flatten()[0]
                        for i in range(9)])
    expected = [0.700, 0.738, 0.532, 0.442, 0.388, 0.350, 0.320, 0.291, 0.256]
    assert stds.tolist() == pytest.approx(expected, abs=1e-3)
    w = noise_aware_weights(stds)
    assert w.mean().item() == pytest.approx(1.0) and w.tolist() == pytest.approx((stds / stds.mean()).tolist())
    # the reference's hard-coded c = 2.25 (SD3.5-M, N = 10) is close to 1 / mean_j s_j
    assert 1 / stds.mean().item() == pytest.approx(2.25, rel=0.05)
    with pytest.raises(ValueError, match="positive"):
        noise_aware_weights(torch.tensor([0.5, 0.0]))


def test_branch_advantages_population_std_and_equal_rewards_give_no_gradient():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    a = branch_advantages(r)
    row = np.array([1.0, 2.0, 3.0, 6.0])
    assert a[0].tolist() == pytest.approx(((row - row.mean()) / (row.std(ddof=0) + 1e-4)).tolist(), rel=1e-6)
    assert torch.equal(a[1], torch.zeros(4))


def test_tempflow_forward_count():
    assert tempflow_forwards(10, [0, 3], children=6) == 9 + 6 * (9 + 6)
    with pytest.raises(ValueError, match="branch points"):
        tempflow_forwards(10, [9], children=6)  # the final step is not a branch point


# ------------------------------------------------------------------------------------------------ G²RPO
def test_granularity_grids_always_end_at_zero():
    sig = sigma_schedule(8, 3.0)
    assert torch.equal(granularity_grid(sig, 0, 1), sig[1:])
    g2 = granularity_grid(sig, 0, 2)  # σ1, then the reference's σ[2::2] = σ2, σ4, σ6, σ8 = 0: nothing appended
    assert torch.equal(g2, sig[[1, 2, 4, 6, 8]])
    g3 = granularity_grid(sig, 1, 3)  # σ2, σ3, σ6, then 0 (the reference scores x̂0 from σ6: one Euler step to 0)
    assert torch.equal(g3[:-1], sig[[2, 3, 6]]) and g3[-1] == 0
    with pytest.raises(ValueError, match="SDE step"):
        granularity_grid(sig, 7, 1)


def test_integrated_advantages_sum_granularities_and_rewards():
    torch.manual_seed(0)
    one = torch.rand(1, 1, 3, 4)
    a1 = integrated_advantages(one)
    assert a1.sum(dim=1).abs().max() < 1e-6  # Σ_g A = 0 per k (one reward, one granularity)
    r = one[0, 0].numpy()
    z = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-8)
    assert a1.numpy() == pytest.approx(z, rel=1e-5)
    two = one.expand(2, 1, 3, 4)  # equal rewards at both granularities → twice the one-granularity advantage
    assert torch.allclose(integrated_advantages(two), 2 * a1)
    big = one.expand(4, 2, 3, 4)  # 8 equal copies would reach ±10: clipped at ±5
    assert integrated_advantages(big).abs().max() == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------------ AWM
def test_batch_std_advantages_against_numpy():
    r = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]])
    n = r.numpy()
    expected = (n - n.mean(axis=1, keepdims=True)) / (n.std(ddof=0) + 1e-4)
    assert batch_std_advantages(r).numpy() == pytest.approx(np.clip(expected, -5, 5), rel=1e-6)
    assert torch.equal(batch_std_advantages(torch.full((2, 3), 0.7)), torch.zeros(2, 3))


def test_stratified_indices_draw_one_per_stratum():
    g = torch.Generator().manual_seed(0)
    seen = torch.stack([stratified_indices(10, 3, g) for _ in range(400)])
    for k, (lo, hi) in enumerate([(0, 3), (3, 7), (7, 10)]):  # edges 0, 3, 7 (6.67 rounded), 10
        assert seen[:, k].min() == lo and seen[:, k].max() == hi - 1
    assert torch.equal(stratified_indices(4, 4, g), torch.arange(4))
    with pytest.raises(ValueError, match="draws"):
        stratified_indices(3, 4, g)


def _fm_setup(rows=3):
    torch.manual_seed(1)
    x0, eps = torch.randn(rows, 2, 3, 3), torch.randn(rows, 2, 3, 3)
    t = torch.tensor([0.2, 0.5, 0.9][:rows])
    v = torch.randn(rows, 2, 3, 3, requires_grad=True)
    return x0, eps, t, v


def test_awm_uniform_gradient_is_advantage_times_flow_matching_gradient():
    x0, eps, t, v = _fm_setup()
    a = 0.4
    loss = awm_loss(flow_matching_error(v, x0, eps), t, torch.full((3,), 5 * a), weighting="uniform")
    (grad,) = torch.autograd.grad(loss, v)
    fm = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)).mean()  # the pretraining loss, written out
    (fm_grad,) = torch.autograd.grad(fm, v)
    torch.testing.assert_close(grad, a * fm_grad)
    assert loss.item() == pytest.approx(-a)  # −Ā·exp(0)


def test_awm_identical_group_samples_give_no_gradient():
    x0, eps, t, v = _fm_setup()
    adv = batch_std_advantages(torch.full((1, 3), 0.25)).flatten()  # one group of identical samples → A = 0
    for weighting in ("uniform", "ghuber"):
        (grad,) = torch.autograd.grad(awm_loss(flow_matching_error(v, x0, eps), t, adv, weighting=weighting), v)
        assert torch.count_nonzero(grad) == 0


def test_ghuber_worked_example():
    """METHODS.md §3: ghuber at L = 0.5, t = 0.8 gives ∂ℓ/∂L = 1.345·Ā."""
    err = torch.tensor([0.5], requires_grad=True)
    for adv in (5.0, -2.5):
        (g,) = torch.autograd.grad(awm_loss(err, torch.tensor([0.8]), torch.tensor([adv])), err)
        assert g.item() == pytest.approx(1.345 * adv / 5, rel=1e-3)
    assert ghuber_psi(torch.tensor(0.0), torch.tensor(0.8)).item() == 0.0


# ------------------------------------------------------------------------------------------------ DiffusionNFT
def test_nft_at_the_old_policy_the_gradient_is_independent_of_beta():
    """At v_θ = v_old: ∂ℓ/∂v = (2r − 1)·∇L_norm = clip(A, ±5)/5 · ∇L_norm for every β. (METHODS.md writes
    clip(A, ±5)·∇; with r = clip(A)/10 + ½ the factor is 2r − 1 = clip(A)/5.)"""
    x0, eps, t, _ = _fm_setup()
    x_t = noised(x0, eps, t)
    v_old = torch.randn_like(x0)
    adv = torch.tensor([2.0, -7.0, 0.5])
    r = nft_optimality(adv)
    assert r.tolist() == pytest.approx([0.7, 0.0, 0.55])
    grads = []
    for beta in (1.0, 0.1, 0.5):
        v = v_old.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(nft_loss(v, v_old, x_t, x0, t, r, beta=beta), v)[0])
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    # the independent form: the adaptively normalised x̂0 error of v itself, its gradient weighted per row
    v = v_old.clone().requires_grad_(True)
    diff = (x_t - t.view(-1, 1, 1, 1) * v - x0).flatten(1)
    norm = (diff.pow(2).mean(dim=1) / diff.abs().mean(dim=1).clamp(min=1e-5).detach())
    (per_row,) = torch.autograd.grad((norm * (adv.clamp(-5, 5) / 5)).mean(), v)
    torch.testing.assert_close(grads[0], per_row)


def test_nft_no_preference_gives_no_gradient_at_the_old_policy():
    """r = ½ (A = 0): the positive pull and the negative push cancel exactly where v_θ = v_old (2r − 1 = 0)."""
    x0, eps, t, _ = _fm_setup()
    v_old = torch.randn_like(x0)
    v = v_old.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nft_loss(v, v_old, noised(x0, eps, t), x0, t, nft_optimality(torch.zeros(3))), v)
    assert g.abs().max() < 1e-7


# ------------------------------------------------------------------------------------------------ lagged copy
def test_lagged_decay_and_update():
    assert lagged_decay(0, cap=0.3) == 0.0 and lagged_decay(100, cap=0.3) == pytest.approx(0.1)
    assert lagged_decay(10_000, cap=0.3) == 0.3 and lagged_decay(10_000, cap=0.5) == 0.5
    phi, theta = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    lagged_update(phi, theta, 0.25)
    assert phi[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    lagged_update(phi, theta, 0.0)
    assert torch.equal(phi[0], theta[0])
    with pytest.raises(ValueError, match="decay"):
        lagged_update(phi, theta, 1.5)
