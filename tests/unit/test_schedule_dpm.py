"""Sigma schedules, the Flash schedule's NFE, and DPM-Solver++ 2M against diffusers."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from learner.algo import dpmpp_2m_step, flash_schedule, infer_shift, sigma_schedule, window_at


def test_reference_schedule_values():
    # Values from ALGORITHM.md §2 (N = 25, s = 3).
    s = sigma_schedule(25, 3.0)
    assert s.shape == (26,)
    expected_head = [1.0, 0.9863, 0.9718, 0.9565]
    expected_tail = [0.2903, 0.2069, 0.1111, 0.0]
    assert s[:4].tolist() == pytest.approx(expected_head, abs=1e-4)
    assert s[-4:].tolist() == pytest.approx(expected_tail, abs=1e-4)
    assert torch.all(s[:-1] > s[1:])
    assert infer_shift(s) == pytest.approx(3.0)


def test_shift_one_is_uniform():
    torch.testing.assert_close(sigma_schedule(4, 1.0), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))


def test_flash_schedule_starts_at_the_first_post_window_sigma():
    s = sigma_schedule(25, 3.0)
    for last in (3, 10, 23):
        f = flash_schedule(s, last, 0.4)
        assert f[0] == s[last + 1] and f[-1] == 0.0
        assert torch.all(f[:-1] > f[1:])


def _nfe(n, w, l, r):
    return l + w + len(flash_schedule(sigma_schedule(n, 3.0), l + w - 1, r)) - 1


def test_flash_star_nfe_matches_the_paper():
    # Paper Table (FLUX): Flash* uses 8 NFE with a frozen window at [0, 4), r ≈ 0.2.
    assert _nfe(25, 4, 0, 0.2) == 8


def test_flash_average_nfe_matches_the_paper():
    # Paper: Flash ≈ 16 NFE on average; 300 iterations, progressive window with τ = 25, w = 4.
    nfes = []
    for m in range(300):
        win = window_at(m, num_steps=25, size=4, shift_interval=25, stride=1)
        nfes.append(_nfe(25, 4, win.start, 0.4))
    assert sum(nfes) / len(nfes) == pytest.approx(16, abs=0.5)


@pytest.mark.parametrize("r", [0.2, 0.4, 0.5, 1.0])
def test_nfe_within_one_of_the_paper_formula(r):
    # Paper formula NFE = l + w + ⌈(N − w − l)·r⌉; ours floors (N − last)·r (see algo/__init__ note 4).
    n, w = 25, 4
    for l in range(0, n - w):
        paper = l + w + math.ceil((n - w - l) * r)
        assert abs(_nfe(n, w, l, r) - paper) <= 1, (l, r)
    # where (N − w − l)·r is integral and (N − last)·r does not cross the next integer, they agree
    assert _nfe(25, 4, 1, 0.5) == 1 + 4 + math.ceil(20 * 0.5)


def _flow_dpm_scheduler():
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, lower_order_final=True,
        final_sigmas_type="zero",
    )


@pytest.mark.parametrize("last,ratio", [(3, 0.4), (8, 0.5), (3, 1.0)])
def test_dpmpp_2m_agrees_with_diffusers(last, ratio):
    sig = flash_schedule(sigma_schedule(25, 3.0), last, ratio)
    sched = _flow_dpm_scheduler()
    sched.set_timesteps(len(sig) - 1)
    # diffusers 0.42 has no `sigmas=` argument here: give it our sigma table directly (its step() reads
    # self.sigmas[step_index], [step_index+1], [step_index−1]).
    sched.sigmas = sig.clone()
    sched.timesteps = sig[:-1] * 1000
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 3, 3, generator=gen) * 0.3).double()

    def velocity(x, s):  # a fixed smooth "model": v = a·x + sin(x)·σ
        return torch.einsum("ij,bjhw->bihw", a[0], x) + torch.sin(x) * s

    x_ref = torch.randn(2, 3, 5, 5, generator=gen)
    x_ours = x_ref.clone().double()
    x_ref = x_ref.double()
    x0_prev, s_prev = None, None
    for j in range(len(sig) - 1):
        s, sn = float(sig[j]), float(sig[j + 1])
        v_ref = velocity(x_ref, s)
        x_ref = sched.step(v_ref, sched.timesteps[j], x_ref).prev_sample
        x0 = x_ours - s * velocity(x_ours, s)
        last_step = j == len(sig) - 2
        # diffusers' lower_order_final makes the last step (< 15 steps) first order; ours returns x̂0 at σ=0.
        x_ours = dpmpp_2m_step(x_ours, x0, None if last_step else x0_prev, s_prev, s, sn)
        x0_prev, s_prev = x0, s
        torch.testing.assert_close(x_ours, x_ref.double(), rtol=1e-5, atol=1e-5)


def test_dpmpp_first_order_is_ddim_like_and_final_step_returns_x0():
    x, x0 = torch.randn(2, 3), torch.randn(2, 3)
    out = dpmpp_2m_step(x, x0, None, None, 0.6, 0.3)
    # First order on the flow ODE is DDIM: x_t = (σ_t/σ_s)·x + (α_t − α_s·σ_t/σ_s)·x̂0, α = 1 − σ.
    expected = (0.3 / 0.6) * x + (0.7 - 0.3 / 0.6 * 0.4) * x0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dpmpp_2m_step(x, x0, torch.randn(2, 3), 0.8, 0.3, 0.0), x0)
    with pytest.raises(ValueError):
        dpmpp_2m_step(x, x0, None, None, 0.3, 0.6)
