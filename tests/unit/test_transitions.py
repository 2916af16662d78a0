"""SDE / ODE transitions against independent formulations (torch.distributions) and worked values."""

import math

import pytest
import torch
from torch.distributions import Normal

from learner.algo import ode_step, sde_mean_std, sde_step, sigma_schedule

KINDS = ["flow", "dance", "cps"]


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 4, 4, generator=g)
    v = torch.randn(b, 3, 4, 4, generator=g)
    return x, v, g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("i", [0, 5, 20])
def test_log_prob_equals_torch_normal(kind, i):
    sig = sigma_schedule(25, 3.0)
    x, v, g = _inputs()
    out = sde_step(x, v, sig[i], sig[i + 1], eta=0.7, kind=kind, generator=g)
    ref = Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample).flatten(1).mean(1)
    assert out.log_prob.shape == (3,)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prev_sample_reproduces_sampled_log_prob(kind):
    sig = sigma_schedule(25, 3.0)
    x, v, g = _inputs()
    sampled = sde_step(x, v, sig[7], sig[8], eta=0.7, kind=kind, generator=g)
    again = sde_step(x, v, sig[7], sig[8], eta=0.7, kind=kind, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(again.log_prob, sampled.log_prob, rtol=0, atol=0)
    other = sde_step(x, v, sig[7], sig[8], eta=0.7, kind=kind, prev_sample=sampled.prev_sample + 0.5)
    assert torch.all(other.log_prob < sampled.log_prob)


@pytest.mark.parametrize("kind", KINDS)
def test_eta_to_zero_gives_the_ode_mean(kind):
    sig = sigma_schedule(25, 3.0)
    x, v, _ = _inputs()
    for i in (0, 10, 23):
        mean, std = sde_mean_std(x, v, sig[i], sig[i + 1], eta=1e-9, kind=kind)
        torch.testing.assert_close(mean, ode_step(x, v, sig[i], sig[i + 1]), rtol=1e-5, atol=1e-5)
        assert float(torch.as_tensor(std).max()) < 1e-7


def test_flow_step0_std_is_exactly_eta():
    sig = sigma_schedule(25, 3.0)
    x, v, _ = _inputs()
    for eta in (0.3, 0.7, 1.0):
        _, std = sde_mean_std(x, v, sig[0], sig[1], eta=eta, kind="flow")
        assert float(std) == pytest.approx(eta, abs=1e-6)


def test_dance_equals_flow_when_g_matches():
    sig = sigma_schedule(25, 3.0)
    x, v, _ = _inputs()
    i, eta = 9, 0.7
    s, sn = float(sig[i]), float(sig[i + 1])
    g_flow = eta * math.sqrt(s / (1 - s))
    m_f, s_f = sde_mean_std(x, v, s, sn, eta=eta, kind="flow")
    m_d, s_d = sde_mean_std(x, v, s, sn, eta=g_flow, kind="dance")
    torch.testing.assert_close(m_f, m_d)
    torch.testing.assert_close(torch.as_tensor(s_f), torch.as_tensor(s_d))


def test_flow_worked_example():
    # Scalar example by hand: x=1, v=0.5, σ=0.5 → σ'=0.25, η=0.7:
    # g = 0.7·sqrt(0.5/0.5) = 0.7; ε̂ = 1 + 0.5·0.5 = 1.25; μ = 1 − 0.25·(0.5 + 0.49/1·1.25) = 0.721875
    # std = 0.7·sqrt(0.25) = 0.35
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    mean, std = sde_mean_std(x, v, 0.5, 0.25, eta=0.7, kind="flow")
    assert float(mean) == pytest.approx(0.721875, abs=1e-7)
    assert float(std) == pytest.approx(0.35, abs=1e-7)


def test_cps_worked_example():
    # σ=0.5 → σ'=0.25, η=0.5: std = 0.25·sin(π/4); x̂0 = 1 − 0.5·0.5 = 0.75; ε̂ = 1.25;
    # μ = 0.75·0.75 + sqrt(0.0625 − std²)·1.25
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    mean, std = sde_mean_std(x, v, 0.5, 0.25, eta=0.5, kind="cps")
    s = 0.25 * math.sin(math.pi / 4)
    assert float(std) == pytest.approx(s)
    assert float(mean) == pytest.approx(0.5625 + math.sqrt(0.0625 - s * s) * 1.25, abs=1e-6)


def test_per_sample_sigmas_match_scalar_calls():
    sig = sigma_schedule(25, 3.0)
    x, v, g = _inputs(b=3)
    idx = torch.tensor([0, 4, 17])
    noise = torch.randn(x.shape, generator=g)
    batched = sde_step(x, v, sig[idx], sig[idx + 1], eta=0.7, noise=noise)
    for b, i in enumerate(idx.tolist()):
        one = sde_step(x[b:b + 1], v[b:b + 1], sig[i], sig[i + 1], eta=0.7, noise=noise[b:b + 1])
        torch.testing.assert_close(batched.log_prob[b:b + 1], one.log_prob)
        torch.testing.assert_close(batched.prev_sample[b:b + 1], one.prev_sample)


def test_gradients_flow_through_mean_only():
    sig = sigma_schedule(25, 3.0)
    x, v, g = _inputs()
    v = v.clone().requires_grad_(True)
    target = torch.randn(x.shape, generator=g).requires_grad_(True)
    out = sde_step(x, v, sig[3], sig[4], eta=0.7, prev_sample=target)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert target.grad is None  # the sample is data, not a function of θ


def test_bad_inputs_are_rejected():
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="noise, prev_sample or a generator"):
        sde_step(x, v, 0.5, 0.4, eta=0.7)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        sde_step(x, v, 0.4, 0.5, eta=0.7, noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step(x, v, 0.5, 0.4, eta=0.7, kind="ddim", noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="scalar or shaped"):
        sde_step(x, v, torch.ones(2) * 0.5, 0.4, eta=0.7, noise=torch.zeros_like(x))
