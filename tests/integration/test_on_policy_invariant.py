"""The on-policy invariant for every backend: with identical weights, log-probs recomputed on the window
steps (learner side, with gradients) equal those recorded while sampling (ratio = 1 within 1e-6, fp32).

Same batch composition on both sides, as the learner uses the rollout's own conditioning; the SD3/FLUX
pipelines are the tiny ones built offline in test_policies_diffusers.py.
"""

import pytest
import torch

from learner.algo import Window, sample_mixed, sigma_schedule, transition_log_probs
from rollout_workers.policies import load_policy
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy

from .test_policies_diffusers import flux_dir, one_thread, sd3_dir  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration
G = 3


def ratio_deviation(policy, prompts, sde_kind="flow", eta=0.7, post="euler"):
    sigmas = sigma_schedule(8, 3.0)
    gen = torch.Generator().manual_seed(0)
    cond = policy.encode_prompts(prompts)
    noise = torch.randn(len(prompts), *policy.latent_shape, generator=gen)
    traj = sample_mixed(policy.velocity, noise, cond, sigmas, Window(2, 3), group_size=G, eta=eta,
                        sde_kind=sde_kind, post_window=post, compress_ratio=0.5 if post == "dpm" else 1.0,
                        generator=gen)
    assert traj.log_probs.dtype == torch.float32 and traj.latents.dtype == torch.float32
    cond_g = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
    devs = []
    for t in range(3):  # one window step at a time: the batch the sampler used for that step
        b = traj.latents.shape[0]
        lp = transition_log_probs(policy.velocity, traj.latents[:, t], traj.next_latents[:, t],
                                  traj.sigmas[t].repeat(b), traj.sigmas_next[t].repeat(b), cond_g,
                                  eta=eta, sde_kind=sde_kind)
        assert lp.requires_grad == any(p.requires_grad for p in policy.trainable_parameters())
        devs.append(float((torch.exp(lp.detach() - traj.log_probs[:, t]) - 1).abs().max()))
    return max(devs)


@pytest.mark.parametrize("sde_kind,post", [("flow", "euler"), ("dance", "euler"), ("cps", "dpm")])
def test_tiny(sde_kind, post):
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64)
    policy = TinyPolicy.from_config(cfg, seed=0)
    assert ratio_deviation(policy, ["a red circle", "two blue squares"], sde_kind, post=post) < 1e-6


def test_tiny_lora():
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64)
    policy = TinyPolicy.from_config(cfg, seed=0, lora_rank=4)
    assert ratio_deviation(policy, ["a red circle", "two blue squares"]) < 1e-6


def test_sd3(sd3_dir):  # noqa: F811
    policy = load_policy("sd3", sd3_dir, height=32, width=32, lora_rank=4)
    assert ratio_deviation(policy, ["a photo", "a cat"]) < 1e-6


def test_sd3_with_cfg(sd3_dir):  # noqa: F811
    policy = load_policy("sd3", sd3_dir, height=32, width=32, lora_rank=4, guidance_scale=3.0)
    assert ratio_deviation(policy, ["a photo", "a cat"]) < 1e-6


def test_flux(flux_dir):  # noqa: F811
    policy = load_policy("flux", flux_dir, height=32, width=32, lora_rank=4, guidance_scale=3.5)
    assert ratio_deviation(policy, ["a photo", "a cat"]) < 1e-6


def branched_ratio_deviation(policy, prompts, eta=0.7):
    """TempFlow-GRPO / G²RPO rollouts: the children's SDE step starts from the main path's velocity at batch P; the
    learner recomputes it at batch P·b·K rows, each row its own σ."""
    from learner.algo.sampler import sample_branched

    sigmas = sigma_schedule(8, 3.0)
    gen = torch.Generator().manual_seed(0)
    cond = policy.encode_prompts(prompts)
    noise = torch.randn(len(prompts), *policy.latent_shape, generator=gen)
    xi = torch.randn(len(prompts), 2, G, *policy.latent_shape, generator=gen)
    traj = sample_branched(policy.velocity, noise, cond, sigmas, [1, 4], children=G, eta=eta, sde_noise=xi)
    rows = {k: v.repeat_interleave(2 * G, 0) for k, v in cond.items()}
    lp = transition_log_probs(policy.velocity, traj.latents[:, 0], traj.next_latents[:, 0], traj.sigmas[:, 0],
                              traj.sigmas_next[:, 0], rows, eta=eta)
    return float((torch.exp(lp.detach() - traj.log_probs[:, 0]) - 1).abs().max())


def test_branched_every_backend(sd3_dir, flux_dir):  # noqa: F811
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64)
    assert branched_ratio_deviation(TinyPolicy.from_config(cfg, seed=0), ["a red circle", "two blue squares"]) < 1e-6
    sd3 = load_policy("sd3", sd3_dir, height=32, width=32, lora_rank=4, guidance_scale=3.0)
    assert branched_ratio_deviation(sd3, ["a photo", "a cat"]) < 1e-6
    flux = load_policy("flux", flux_dir, height=32, width=32, lora_rank=4, guidance_scale=3.5)
    assert branched_ratio_deviation(flux, ["a photo", "a cat"]) < 1e-6
