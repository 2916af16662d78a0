"""The gradient signal-to-noise diagnostic: its arithmetic, and that it separates a learnable reward from noise."""

import itertools

import numpy as np
import pytest
import torch

from learner.tools.diagnose import brightness, gradient_snr, iterations_for_snr, pairwise_cosine, snr_squared
from services.config import load_config


def test_pairwise_cosine_matches_the_signal_plus_noise_formula():
    # g_i = s + n_i, |s|^2 = 1, E|n|^2 = 3  =>  E cos = 1 / (1 + 3) = 0.25, SNR^2 = 1/3
    gen = torch.Generator().manual_seed(0)
    d = 4000
    s = torch.randn(d, generator=gen)
    s /= s.norm()
    grads = [s + torch.randn(d, generator=gen) * (3.0 / d) ** 0.5 for _ in range(12)]
    cos = pairwise_cosine(grads)
    assert cos.shape == (66,)
    assert abs(cos.mean() - 0.25) < 0.02
    assert abs(snr_squared(cos.mean()) - 1 / 3) < 0.04
    # and against a direct computation of one pair
    a, b = grads[0], grads[1]
    assert cos[0] == pytest.approx(float(torch.dot(a, b) / (a.norm() * b.norm())), rel=1e-6)


def test_iterations_for_snr_worked_examples():
    # c = 0.1 -> SNR^2 = 1/9 per batch -> 9 / (1/9) = 81 batches for SNR 3
    assert iterations_for_snr(0.1) == pytest.approx(81.0)
    assert iterations_for_snr(0.5, k=2.0) == pytest.approx(4.0)
    assert iterations_for_snr(0.0) == float("inf")
    assert iterations_for_snr(-0.02) == float("inf")
    with pytest.raises(ValueError):
        pairwise_cosine([torch.ones(3)])
    assert np.isnan(pairwise_cosine([torch.zeros(3), torch.ones(3)])[0])


def test_a_learnable_reward_has_more_gradient_signal_than_an_image_blind_one():
    torch.set_num_threads(1)
    cfg = load_config([], ["rollout.batch_size=64", "sampler.num_steps=6", "window.size=2"])
    counter = itertools.count()

    def blind(images, prompts):  # scores that ignore the images: no signal by construction
        return np.random.default_rng(next(counter)).random(len(images)).astype(np.float32)

    # measured: brightness 0.112 ± 0.030, blind -0.026 ± 0.031 (mean ± sd over the 10 pairs)
    rows = gradient_snr(cfg, {"brightness": brightness, "blind": blind}, num_batches=5)
    by = {r["reward"]: r for r in rows}
    assert by["brightness"]["cosine"] > max(0.04, 2 * by["brightness"]["cosine_std"])  # clear of its own noise
    assert abs(by["blind"]["cosine"]) < 2 * by["blind"]["cosine_std"]  # within the pair-to-pair noise of 0
    assert by["brightness"]["cosine"] > by["blind"]["cosine"] + 0.04
    assert by["brightness"]["iterations_for_snr3"] < by["blind"]["iterations_for_snr3"]
