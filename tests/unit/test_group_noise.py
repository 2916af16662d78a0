"""`sampler.group_noise`: a group's members from one initial noise (MixGRPO's and DanceGRPO's references,
`--init_same_noise`) or each from its own (Flow-GRPO's reference draws every image's latents). Independent noise
is checked against G groups of one member each, the rollout against its seeded streams, and the learner's
recomputed log-probabilities against the worker's (nothing is shared that differs)."""

from __future__ import annotations

import pytest
import torch

from learner.algo import Stream, Window, sample_mixed, seeded_generator, sigma_schedule
from services.config import ConfigError, load_config
from tests.unit.test_sampler import SHAPE, G, P, velocity
from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"c": torch.randn(P, 3, generator=g), "bias": torch.randn(P, generator=g)}
    return cond, torch.randn(P * G, *SHAPE, generator=g), torch.randn(P * G, 4, *SHAPE, generator=g)


@pytest.mark.parametrize("post,ratio", [("euler", 1.0), ("dpm", 0.2)])
@pytest.mark.parametrize("start", [0, 5])
def test_independent_members_are_groups_of_one(post, ratio, start):
    """Member j of group p from its own noise is the trajectory of a one-member group of prompt p with that noise."""
    cond, noise, xi = _inputs()
    sigmas, window = sigma_schedule(16, 3.0), Window(start, 4)
    kw = dict(eta=0.7, post_window=post, compress_ratio=ratio)
    traj = sample_mixed(velocity, noise, cond, sigmas, window, group_size=G, sde_noise=xi, shared_noise=False, **kw)
    for row in range(P * G):
        c = {k: v[row // G:row // G + 1] for k, v in cond.items()}
        one = sample_mixed(velocity, noise[row:row + 1], c, sigmas, window, group_size=1, sde_noise=xi[row:row + 1],
                           **kw)
        torch.testing.assert_close(traj.final[row], one.final[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj.log_probs[row], one.log_probs[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj.latents[row], one.latents[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])  # members differ from the first window step
    assert traj.image_evals == P * G * traj.nfe  # every member evaluated at every step: nothing shared


@pytest.mark.parametrize("start", [0, 5])
def test_equal_member_noises_give_the_shared_trajectory_at_its_cost_plus_the_unshared_steps(start):
    cond, noise, xi = _inputs(1)
    sigmas, window = sigma_schedule(16, 3.0), Window(start, 4)
    shared = sample_mixed(velocity, noise[::G], cond, sigmas, window, group_size=G, eta=0.7, sde_noise=xi)
    each = sample_mixed(velocity, noise[::G].repeat_interleave(G, 0), cond, sigmas, window, group_size=G, eta=0.7,
                        sde_noise=xi, shared_noise=False)
    torch.testing.assert_close(each.final, shared.final, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(each.log_probs, shared.log_probs, rtol=1e-6, atol=1e-6)
    # the shared prefix and first window step: P evaluations each instead of P·G
    assert each.image_evals - shared.image_evals == (G - 1) * P * (start + 1)


def test_independent_noise_needs_one_row_per_member():
    cond, noise, xi = _inputs()
    with pytest.raises(ValueError, match="one row per member"):
        sample_mixed(velocity, noise[:-1], cond, sigma_schedule(16, 3.0), Window(0, 4), group_size=G, eta=0.7,
                     sde_noise=xi, shared_noise=False)


def test_the_worker_draws_each_members_noise_from_its_groups_stream_and_the_learner_agrees():
    window = (2, 3)
    batch = make_worker(small_policy(), group_noise="independent").rollout(0, window, PROMPTS, [0, 1, 2, 3])
    again = make_worker(small_policy(), group_noise="independent").rollout(0, window, PROMPTS, [0, 1, 2, 3])
    for name in ("latents", "next_latents", "log_probs"):  # seeded: the same run draws the same noise
        torch.testing.assert_close(getattr(batch, name), getattr(again, name), rtol=0, atol=0)
    g = batch.group_size
    for p in range(len(PROMPTS)):
        starts = batch.latents[p * g:(p + 1) * g, 0]
        assert all(not torch.equal(starts[0], starts[j]) for j in range(1, g)), "members must start apart"
    # each group's stream: its G initial noises first, then the window's noise
    worker = make_worker(small_policy(), group_noise="independent")
    init, sde = worker._noise(0, [2], Window(*window))
    gen = seeded_generator(3, Stream.ROLLOUT_NOISE, 0, 2)
    shape = worker.policy.latent_shape
    torch.testing.assert_close(init, torch.randn((g, *shape), generator=gen), rtol=0, atol=0)
    torch.testing.assert_close(sde, torch.randn((g, 3, *shape), generator=gen), rtol=0, atol=0)
    # the shared worker's group noise is the first member's
    shared_init, _ = make_worker(small_policy())._noise(0, [2], Window(*window))
    torch.testing.assert_close(shared_init[0], init[0], rtol=0, atol=0)
    # the learner recomputes each member's log-probabilities from its own start: ratio 1, nothing shared
    stats = make_learner(small_policy(), update_order="by_group").update(batch)
    assert stats["first_ratio_dev"] < 1e-6
    assert stats["forward_rows"] == stats["trained_sample_steps"] == len(PROMPTS) * g * 3


def test_config_field_presets_and_refusals():
    assert load_config([]).sampler.group_noise == "shared"
    assert load_config(["mixgrpo"]).sampler.group_noise == "shared"
    assert load_config(["dance_grpo"]).sampler.group_noise == "shared"
    assert load_config(["flow_grpo"]).sampler.group_noise == "independent"  # its reference's sampling
    with pytest.raises(ConfigError, match="group_noise"):
        load_config(["tempflow_grpo"], ["sampler.group_noise=independent"])
    with pytest.raises(ConfigError, match="group_noise"):
        load_config([], ["sampler.group_noise=per_image"])
    with pytest.raises(ValueError, match="group_noise"):
        make_worker(small_policy(), group_noise="per_image")
    with pytest.raises(ValueError, match="group_noise shared"):
        make_worker(small_policy(), group_noise="independent", branching="tempflow")
