"""Advantages (worked examples, zero variance, vectorised = loop) and the clipped loss."""

import statistics

import pytest
import torch

from learner.algo import combine_advantages, group_advantages, grpo_loss


def test_group_advantages_worked_example():
    # rewards 1, 2, 3: mean 2, unbiased std 1 → −1, 0, 1
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]]))
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 0.0, 1.0]))
    # 5, 5, 8: mean 6, unbiased std sqrt(3) → (−1, −1, 2)/sqrt(3)
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, -1.0, 2.0]) / 3**0.5)


def test_zero_variance_group_gives_zeros_not_nan():
    adv = group_advantages(torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 1.0]]))
    assert torch.all(adv[0] == 0) and torch.isfinite(adv).all()


def test_vectorised_equals_loop():
    r = torch.rand(7, 12, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(r)
    for p in range(7):
        row = r[p].tolist()
        mu, sd = statistics.mean(row), statistics.stdev(row)
        for j in range(12):
            assert float(adv[p, j]) == pytest.approx((row[j] - mu) / (sd + 1e-8), rel=1e-5, abs=1e-6)


def test_bad_rewards_rejected():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_combine_advantage_and_reward_aggregation():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[30.0, 10.0, 20.0]])
    out = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 3.0})
    expected = 0.25 * torch.tensor([-1.0, 0.0, 1.0]) + 0.75 * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(out[0], expected)
    out_r = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, aggregation="reward")
    torch.testing.assert_close(out_r, group_advantages(0.25 * a + 0.75 * b))
    with pytest.raises(ValueError, match="do not match"):
        combine_advantages({"a": a}, {"b": 1.0})


EPS = 0.1  # large so the three cases are easy to read


def _loss(ratio, adv):
    lp = torch.log(torch.tensor([ratio], dtype=torch.float64)).requires_grad_(True)
    loss, m = grpo_loss(lp, torch.zeros(1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                        clip_range=EPS)
    loss.backward()
    return float(loss), float(lp.grad), m


def test_loss_unclipped_case():
    loss, grad, m = _loss(1.05, 2.0)  # inside [0.9, 1.1]: −A·ρ, d/dlogρ = −A·ρ
    assert loss == pytest.approx(-2.1)
    assert grad == pytest.approx(-2.1)
    assert float(m["clip_frac"]) == 0.0


def test_loss_clipped_positive_advantage():
    loss, grad, m = _loss(1.5, 2.0)  # ρ > 1+ε with A > 0: −A·(1+ε), no gradient
    assert loss == pytest.approx(-2.2)
    assert grad == 0.0
    assert float(m["clip_frac"]) == 1.0


def test_loss_clipped_negative_advantage():
    loss, grad, _ = _loss(0.5, -2.0)  # ρ < 1−ε with A < 0: −A·(1−ε) = 1.8, no gradient
    assert loss == pytest.approx(1.8)
    assert grad == 0.0
    # ...but a ratio moving the wrong way is not clipped: ρ = 1.5, A < 0 → −A·ρ = 3, gradient flows
    loss, grad, _ = _loss(1.5, -2.0)
    assert loss == pytest.approx(3.0) and grad == pytest.approx(3.0)


def test_loss_at_ratio_one_and_advantage_clip():
    lp = torch.zeros(4, 3, requires_grad=True)
    adv = torch.tensor([10.0, -1.0, 0.5, -7.0])  # clipped to ±5
    loss, m = grpo_loss(lp, torch.zeros(4, 3), adv, clip_range=1e-4)
    assert float(loss) == pytest.approx(-(5 - 1 + 0.5 - 5) / 4)
    assert float(m["ratio_mean"]) == 1.0 and m["loss_per_step"].shape == (3,)
    loss.backward()
    torch.testing.assert_close(lp.grad, (-adv.clamp(-5, 5) / 12)[:, None].expand(4, 3))
