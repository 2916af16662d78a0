"""The mixed sampler against a naive per-member loop, and the on-policy invariant."""

import pytest
import torch

from learner.algo import (
    Window,
    dpmpp_2m_step,
    flash_schedule,
    ode_step,
    sample_mixed,
    sde_step,
    sigma_schedule,
    transition_log_probs,
)

P, G, SHAPE = 3, 4, (3, 4, 4)


def velocity(x, sigma, cond):  # a toy conditional "model": (B, 3, H, W)
    c = cond["c"][:, :, None, None]
    return torch.tanh(x * c) + sigma[:, None, None, None] * cond["bias"][:, None, None, None]


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.randn(P, 3, generator=g), "bias": torch.randn(P, generator=g)}
    noise = torch.randn(P, *SHAPE, generator=g)
    return cond, noise, g


def naive(noise, cond, sigmas, window, sde_noise, post="euler", ratio=1.0):
    """Every member stepped from its own copy of the noise: no shared prefix, plain loops."""
    x = noise.repeat_interleave(G, 0)
    cg = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
    lps = []
    n = len(sigmas) - 1
    post_start = window.stop if post == "euler" else n
    for i in range(post_start):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((x.shape[0],), s), cg)
        if i in window.steps:
            out = sde_step(x, v, s, sn, eta=0.7, noise=sde_noise[:, i - window.start])
            x = out.prev_sample
            lps.append(out.log_prob)
        elif i < window.stop or post == "euler":
            x = ode_step(x, v, s, sn)
        if post == "dpm" and i == window.last:
            break
    if post == "euler":
        for i in range(window.stop, n):
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            x = ode_step(x, velocity(x, torch.full((x.shape[0],), s), cg), s, sn)
    else:
        f = flash_schedule(sigmas, window.last, ratio)
        prev = (None, None)
        for j in range(len(f) - 1):
            s, sn = float(f[j]), float(f[j + 1])
            x0 = x - s * velocity(x, torch.full((x.shape[0],), s), cg)
            x = dpmpp_2m_step(x, x0, prev[0], prev[1], s, sn)
            prev = (x0, s)
    return x, torch.stack(lps, 1)


@pytest.mark.parametrize("post,ratio", [("euler", 1.0), ("dpm", 0.4), ("dpm", 0.2)])
@pytest.mark.parametrize("start", [0, 5, 11])
def test_shared_prefix_equals_naive(post, ratio, start):
    cond, noise, g = _setup()
    sigmas = sigma_schedule(16, 3.0)
    window = Window(start, 4)
    sde_noise = torch.randn(P * G, 4, *SHAPE, generator=g)
    traj = sample_mixed(velocity, noise, cond, sigmas, window, group_size=G, eta=0.7, post_window=post,
                        compress_ratio=ratio, sde_noise=sde_noise)
    final, lps = naive(noise, cond, sigmas, window, sde_noise, post, ratio)
    torch.testing.assert_close(traj.final, final, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traj.log_probs, lps, rtol=1e-6, atol=1e-6)
    # members of a group are identical before the window, different after it
    assert torch.equal(traj.latents[0, 0], traj.latents[G - 1, 0])
    assert not torch.equal(traj.next_latents[0, 0], traj.next_latents[1, 0])


def test_trajectory_shapes_dtypes_and_nfe():
    cond, noise, g = _setup()
    sigmas = sigma_schedule(25, 3.0)
    traj = sample_mixed(velocity, noise, cond, sigmas, Window(6, 4), group_size=G, eta=0.7, generator=g)
    assert traj.latents.shape == traj.next_latents.shape == (P * G, 4, *SHAPE)
    assert traj.log_probs.shape == (P * G, 4)
    assert all(t.dtype == torch.float32 for t in (traj.latents, traj.next_latents, traj.log_probs, traj.sigmas))
    torch.testing.assert_close(traj.sigmas, sigmas[6:10].float())
    torch.testing.assert_close(traj.sigmas_next, sigmas[7:11].float())
    assert traj.nfe == 25
    assert traj.image_evals == P * 7 + P * G * 18  # the prefix and the first window step: once per group
    flash_star = sample_mixed(velocity, noise, cond, sigmas, Window(0, 4), group_size=G, eta=0.7,
                              generator=g, post_window="dpm", compress_ratio=0.2)
    assert flash_star.nfe == 8


def test_on_policy_invariant_ratio_is_one():
    cond, noise, g = _setup()
    sigmas = sigma_schedule(16, 3.0)
    traj = sample_mixed(velocity, noise, cond, sigmas, Window(4, 4), group_size=G, eta=0.7, generator=g)
    b, w = traj.log_probs.shape
    cond_g = {k: v.repeat_interleave(G, 0).repeat_interleave(w, 0) for k, v in cond.items()}
    lp = transition_log_probs(
        velocity, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
        traj.sigmas.repeat(b), traj.sigmas_next.repeat(b), cond_g, eta=0.7,
    ).view(b, w)
    ratio = torch.exp(lp - traj.log_probs)
    assert (ratio - 1).abs().max() < 1e-6


def test_validation():
    cond, noise, g = _setup()
    sigmas = sigma_schedule(8, 3.0)
    with pytest.raises(ValueError, match="past the last trainable step"):
        sample_mixed(velocity, noise, cond, sigmas, Window(4, 4), group_size=G, eta=0.7, generator=g)
    with pytest.raises(ValueError, match="sde_noise or a generator"):
        sample_mixed(velocity, noise, cond, sigmas, Window(0, 2), group_size=G, eta=0.7)


def test_sample_ode_equals_mixed_sampler_limit():
    # With η → 0 the window is deterministic, so the mixed sampler reduces to the plain ODE.
    from learner.algo import sample_ode
    cond, noise, g = _setup()
    sigmas = sigma_schedule(12, 3.0)
    ode = sample_ode(velocity, noise, cond, sigmas)
    traj = sample_mixed(velocity, noise, cond, sigmas, Window(3, 4), group_size=1, eta=1e-12, generator=g)
    torch.testing.assert_close(traj.final, ode, rtol=1e-5, atol=1e-5)
