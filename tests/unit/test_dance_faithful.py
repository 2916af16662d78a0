"""The DanceGRPO baseline as its reference trains it (XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py).

- `train_one_step` draws a permutation of the trainable timesteps per sample and trains its first
  int(T·timestep_fraction): each row its own k steps (`grpo.train_selection=per_sample`), at the same cost
  as one subset for the batch.
- `run_sample_step` runs its SDE at all N steps but decodes the last step's x̂0, so the last step's noise never
  reaches the image; it trains steps 0 … N−2 only. Our window of N−1 SDE steps and a deterministic last
  step give the same images from the same noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.algo import Stream, sample_mixed, seeded_generator, sigma_schedule, transition_step
from learner.algo.window import Window
from learner.training.selection import trained_count, trained_steps, trained_steps_per_sample
from services.config import ConfigError, load_config
from services.types import merge_batches
from tests.unit.test_trainer_inprocess import PROMPTS, G, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8  # make_worker's steps: trainable steps 0 … 6, DanceGRPO's window is all seven
K = trained_count(N - 1, 0.6)  # round(4.2) = 4 of 7


@pytest.fixture(scope="module")
def batch():
    return make_worker(small_policy(), sde_kind="dance", eta=0.3).rollout(0, (0, N - 1), PROMPTS, [0, 1, 2, 3])


def dance_learner(policy, **kw):
    return make_learner(policy, train_fraction=0.6, train_selection="per_sample", sde_kind="dance", eta=0.3, **kw)


# ---------------------------------------------------------------------------------- the selection
def test_each_row_draws_its_own_k_steps_seeded_by_its_key():
    sel = trained_steps_per_sample(15, 0.6, 3, 7, 0, [0, 1, 2, 3], 4)  # 16 rows, 9 of 15 steps each
    assert sel.shape == (16, 9) and sel.dtype == torch.long
    for row in sel:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= int(row.min()) and int(row.max()) < 15
    assert len({tuple(r) for r in sel.tolist()}) > 8  # rows differ (one subset for all would give 1)
    assert len(torch.unique(sel)) == 15  # together the rows train every step
    # independently: row (group 1, member 2) is the first 9 of its own seeded permutation
    perm = torch.randperm(15, generator=seeded_generator(3, Stream.ROW_STEPS, 7, 0, 1, 2))
    assert sel[1 * 4 + 2].tolist() == sorted(perm[:9].tolist())
    assert torch.equal(sel, trained_steps_per_sample(15, 0.6, 3, 7, 0, [0, 1, 2, 3], 4))  # reproducible
    for other in [(3, 8, 0), (3, 7, 1), (4, 7, 0)]:  # another iteration, inner epoch, run seed
        assert not torch.equal(sel, trained_steps_per_sample(15, 0.6, *other, [0, 1, 2, 3], 4))


def test_a_row_trains_the_same_steps_in_any_shard():
    whole = trained_steps_per_sample(15, 0.6, 3, 7, 0, [0, 1, 2, 3], 4)
    shard = trained_steps_per_sample(15, 0.6, 3, 7, 0, [3, 1], 4)  # groups 3 and 1, in that order
    assert torch.equal(shard, torch.cat([whole[12:16], whole[4:8]]))


def test_the_cost_is_the_per_iteration_subsets(batch):
    assert K == len(trained_steps(N - 1, 0.6, 3, 0)) == 4
    a = dance_learner(small_policy()).update(batch)
    b = make_learner(small_policy(), train_fraction=0.6, sde_kind="dance", eta=0.3).update(batch)
    assert a["steps_per_row"] == b["steps_per_row"] == K
    assert a["trained_sample_steps"] == b["trained_sample_steps"] == 4 * G * K
    assert len(b["trained_steps"]) == K < len(a["trained_steps"])  # the rows together cover more steps
    assert a["first_ratio_dev"] < 1e-6 and len(a["loss_per_step"]) == K


def test_sharded_and_merged_rollouts_give_the_same_update():
    worker = make_worker(small_policy(), sde_kind="dance", eta=0.3)
    whole = worker.rollout(0, (0, N - 1), PROMPTS, [0, 1, 2, 3])
    merged = merge_batches([worker.rollout(0, (0, N - 1), PROMPTS[2:], [2, 3]),
                            worker.rollout(0, (0, N - 1), PROMPTS[:2], [0, 1])], num_groups=4)
    a, b = dance_learner(small_policy()).update(whole), dance_learner(small_policy()).update(merged)
    assert a["trained_steps"] == b["trained_steps"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-7) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_one_backward_per_timestep_gives_the_same_update(batch):
    a = dance_learner(small_policy()).update(batch)
    b = dance_learner(small_policy(), timesteps_per_backward=1).update(batch)  # column j: each row's j-th step
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-7) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["trained_steps"] == a["trained_steps"]


def test_per_sample_gradient_equals_a_loop_over_samples(batch):
    """The learner's batched gradient against DanceGRPO's loop: for each sample, for each of its own steps, the
    clipped loss of that one transition / (samples × k), one backward each. The learner's weights are moved off
    the rollout's so the ratios are not 1, and the clip range is wide so that every term carries a gradient."""
    rows = torch.arange(batch.num_rows)
    learner = dance_learner(small_policy(), micro_batch_size=len(rows), gradient_accumulation_steps=1,
                            clip_range=0.5)
    with torch.no_grad():
        for p in learner.params:
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sel, adv = learner.selection(batch, 0), learner.advantages(batch)
    cond = {k: v.repeat_interleave(batch.group_size, 0) for k, v in batch.cond.items()}
    learner.optimizer.zero_grad(set_to_none=True)
    learner._forward_backward(batch, cond, rows, sel, adv)
    batched = [p.grad.clone() for p in learner.params]

    learner.optimizer.zero_grad(set_to_none=True)
    for i in rows.tolist():
        for s in sel[i].tolist():
            step = transition_step(learner.policy.velocity, batch.latents[i, s][None], batch.next_latents[i, s][None],
                                   batch.sigmas[s:s + 1], batch.sigmas_next[s:s + 1],
                                   {k: v[i:i + 1] for k, v in cond.items()}, eta=0.3, sde_kind="dance")
            ratio = torch.exp(step.log_prob - batch.log_probs[i, s])
            a = adv[i].clamp(-5, 5)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.5, 1.5)).sum()
            (loss / (len(rows) * K)).backward()
    for got, p in zip(batched, learner.params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in batched)


# ---------------------------------------------------------------------------------- the last step
def test_the_references_last_step_noise_never_reaches_the_image():
    """DanceGRPO's rollout written out in its own form (the SDE mean through the score −(x − (1−σ)·x̂0)/σ², the
    SDE at every step, the image = the last step's x̂0) against `sample_mixed` with the window 0 … N−2 and an
    Euler last step: same transitions from the same noise, and the same image whatever the last step's draw."""
    gen = torch.Generator().manual_seed(0)
    w_mat = 0.3 * torch.randn(12, 12, generator=gen)

    def velocity(x, sigma, cond):  # a smooth stand-in for the model: v(x, σ) of shape (B, 3, 2, 2)
        return torch.tanh(x.flatten(1) @ w_mat).view_as(x) * (1 + sigma.view(-1, 1, 1, 1)) + cond["c"].view(-1, 1, 1, 1)

    n, eta, g = 6, 0.3, 2
    sigmas = sigma_schedule(n, 3.0)
    noise = torch.randn(1, 3, 2, 2, generator=gen)
    cond = {"c": torch.tensor([0.1])}
    xi = torch.randn(g, n - 1, 3, 2, 2, generator=gen)
    ours = sample_mixed(velocity, noise, cond, sigmas, Window(0, n - 1), group_size=g, eta=eta, sde_kind="dance",
                        sde_noise=xi)

    def reference(last_noise):
        x, cond_g, trail = noise.repeat(g, 1, 1, 1), {"c": cond["c"].repeat(g)}, []
        for i in range(n):
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            v = velocity(x, torch.full((g,), s), cond_g)
            x0_hat = x - s * v
            score = -(x - (1 - s) * x0_hat) / s**2
            mean = x + (sn - s) * v - 0.5 * eta**2 * score * (sn - s)
            x = mean + eta * math.sqrt(s - sn) * (xi[:, i] if i < n - 1 else last_noise)
            trail.append(x)
        return x0_hat, trail

    image, trail = reference(torch.randn(g, 3, 2, 2, generator=gen))
    image2, trail2 = reference(torch.randn(g, 3, 2, 2, generator=gen))
    torch.testing.assert_close(ours.next_latents, torch.stack(trail[:-1], 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.final, image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image2, image, rtol=0, atol=0)  # the last draw is discarded …
    assert not torch.allclose(trail2[-1], trail[-1])  # … though the last SDE sample differs


# ---------------------------------------------------------------------------------- the config
def test_the_preset_selects_per_sample_and_bad_combinations_name_the_field():
    dance = load_config(["dance_grpo"])
    assert (dance.grpo.train_selection, dance.grpo.train_fraction, dance.window.size, dance.grpo.kl_beta) == (
        "per_sample", 0.6, 15, 0.0)
    assert load_config(["mixgrpo"]).grpo.train_selection == "per_iteration"
    assert load_config(["sd3_5_medium", "dance_grpo"]).grpo.kl_beta == 0.0  # no KL term in DanceGRPO
    for overrides in (["grpo.train_fraction=1.0"], ["grpo.objective=awm"],
                      ["sampler.branching=tempflow", "grpo.train_fraction=1.0"]):
        with pytest.raises(ConfigError, match="grpo.train_selection=per_sample"):
            load_config(["dance_grpo"], overrides)
    with pytest.raises(ValueError, match="per_sample with grpo"):
        make_learner(small_policy(), train_selection="per_sample", branching="tempflow")
