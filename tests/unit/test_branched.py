"""Branched rollouts (TempFlow-GRPO, G²RPO; METHODS.md §1–2) against written-out formulations: the sampler's rows,
log-probs and finished images; the learner's per-branch-step advantages, noise-aware weights and their gradient;
G²RPO's integrated advantages over granularities and rewards and its one-k-per-optimizer-step order; the batch's
shape checks and merge; the config's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.algo import sigma_schedule, transition_log_probs
from learner.algo.family import granularity_grid
from learner.algo.sampler import sample_branched
from learner.training.objectives import MatchingSpec
from services import shapes_world
from services.config import ConfigError, load_config
from services.types import merge_batches
from tests.unit.test_trainer_inprocess import PROMPTS, Done, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")
ETA, K = 0.7, 4


class TwoRewards:
    """The verifier and the image's mean brightness: two rewards with different group orderings."""

    def submit(self, name, images, prompts):
        if name == "verifier":
            return Done(np.array([shapes_world.verify(p, im).score for p, im in zip(prompts, images)], np.float32))
        return Done(images.reshape(len(images), -1).mean(1).astype(np.float32) / 255)


def two_reward_worker(branching, **kw):
    worker = make_worker(small_policy(), branching=branching, **kw)
    worker.rewards, worker.reward_names = TwoRewards(), ["verifier", "bright"]
    return worker


# ------------------------------------------------------------------------------------------------ the sampler
def velocity(x, sigma, cond):  # a smooth nonlinear stand-in for a model: depends on x, σ and the conditioning
    return torch.tanh(0.7 * x + sigma.view(-1, 1, 1, 1)) - 0.3 * x + cond["c"].view(-1, 1, 1, 1)


def written_out_child(noise, c, sigmas, k, xi, grid):
    """One child by hand: Euler main path to σ_k, the Flow-GRPO SDE step written from ALGORITHM.md, Euler on `grid`."""
    cond = {"c": c.view(1)}
    x = noise[None]
    for i in range(k):
        x = x - (sigmas[i] - sigmas[i + 1]) * velocity(x, sigmas[i].view(1), cond)
    s, sn = float(sigmas[k]), float(sigmas[k + 1])
    v = velocity(x, torch.tensor([s]), cond)
    g = ETA * math.sqrt(s / (1 - (sn if s >= 1 else s)))
    eps_hat = x + (1 - s) * v
    mean = x - (s - sn) * (v + g**2 / (2 * s) * eps_hat)
    std = g * math.sqrt(s - sn)
    y = mean + std * xi[None]
    log_prob = (-((y - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
    start = y
    for a in range(len(grid) - 1):
        y = y - (grid[a] - grid[a + 1]) * velocity(y, grid[a].view(1), cond)
    return x[0].float(), start[0].float(), float(log_prob), y[0].float()


def test_branched_rows_equal_a_written_out_child_by_child_loop():
    torch.manual_seed(0)
    sigmas = sigma_schedule(8, 3.0)
    p, steps, shape = 2, [1, 3, 4], (2, 3, 3)
    noise, c = torch.randn(p, *shape), torch.tensor([0.1, -0.2])
    xi = torch.randn(p, len(steps), K, *shape)
    grids = [lambda k, j=j: granularity_grid(sigmas, k, j) for j in (1, 2)]
    traj = sample_branched(velocity, noise, {"c": c}, sigmas, steps, children=K, eta=ETA, sde_noise=xi, grids=grids)
    rows = p * len(steps) * K
    assert traj.finals.shape == (2, rows, *shape) and traj.latents.shape == (rows, 1, *shape)
    for pi in range(p):
        for j, k in enumerate(steps):
            for ki in range(K):
                r = (pi * len(steps) + j) * K + ki  # group, branch step, child
                assert int(traj.steps[r]) == k and float(traj.sigmas[r, 0]) == pytest.approx(float(sigmas[k]))
                for gi, gran in enumerate((1, 2)):
                    x, y, lp, final = written_out_child(noise[pi], c[pi], sigmas, k, xi[pi, j, ki],
                                                        granularity_grid(sigmas, k, gran))
                    torch.testing.assert_close(traj.finals[gi, r], final, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(traj.latents[r, 0], x, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(traj.next_latents[r, 0], y, rtol=1e-5, atol=1e-6)
                assert float(traj.log_probs[r, 0]) == pytest.approx(lp, rel=1e-5, abs=1e-5)
    # the main path runs to the last branch step only; each child's grids cost len(grid) − 1 evaluations
    finish = sum(len(granularity_grid(sigmas, k, j)) - 1 for k in steps for j in (1, 2))
    assert traj.image_evals == p * (steps[-1] + 1) + p * K * finish
    with pytest.raises(ValueError, match="increasing"):
        sample_branched(velocity, noise, {"c": c}, sigmas, [3, 1], children=K, eta=ETA, sde_noise=xi)
    with pytest.raises(ValueError, match="increasing"):
        sample_branched(velocity, noise, {"c": c}, sigmas, [7], children=K, eta=ETA, sde_noise=xi[:, :1])


# ------------------------------------------------------------------------------------------------ TempFlow-GRPO
@pytest.fixture(scope="module")
def tempflow_batch():
    return two_reward_worker("tempflow").rollout(0, (1, 3), PROMPTS[:2], [0, 1])  # 2 prompts × 3 steps × 4 children


def test_tempflow_batch_shape_and_sharding(tempflow_batch):
    b = tempflow_batch
    assert b.num_rows == 24 and b.group_size == 12 and b.branches == 3 and b.latents.shape[1] == 1
    assert b.steps.view(2, 3, 4)[:, :, 0].tolist() == [[1, 2, 3], [1, 2, 3]] and b.rewards["bright"].shape == (24,)
    parts = [two_reward_worker("tempflow").rollout(0, (1, 3), PROMPTS[1:2], [1]),
             two_reward_worker("tempflow").rollout(0, (1, 3), PROMPTS[:1], [0])]
    merged = merge_batches(parts, num_groups=2)
    for name in ("latents", "next_latents", "log_probs", "sigmas", "sigmas_next", "steps"):
        torch.testing.assert_close(getattr(merged, name), getattr(b, name))
    torch.testing.assert_close(merged.rewards["verifier"], b.rewards["verifier"])


def test_tempflow_advantages_and_noise_aware_weights_written_out(tempflow_batch):
    b = tempflow_batch
    learner = make_learner(small_policy(), reward_weights={"verifier": 3.0, "bright": 1.0}, branching="tempflow")
    expected = np.zeros(24)
    for name, w in (("verifier", 0.75), ("bright", 0.25)):
        r = b.rewards[name].numpy().reshape(6, 4)  # one row per (main path, branch step): its 4 children
        expected += w * ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=0, keepdims=True) + 1e-4)).flatten()
    assert learner.advantages(b).numpy() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    sig = sigma_schedule(8, 3.0)
    s = [ETA * math.sqrt(float(sig[k]) / (1 - float(sig[k]))) * math.sqrt(float(sig[k] - sig[k + 1])) for k in (1, 2, 3)]
    w = np.array(s) / np.mean(s)
    assert learner.row_weights(b).numpy() == pytest.approx(np.repeat(np.tile(w, 2), 4), rel=1e-5)


def test_tempflow_gradient_is_the_noise_weighted_policy_gradient(tempflow_batch):
    """At ratio 1 the clipped loss's gradient is −mean_rows w·A·∇log π: computed here with the learner's weights and
    advantages applied by hand, against the learner's own `policy_gradient`."""
    b = tempflow_batch
    learner = make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}, branching="tempflow")
    grad = learner.policy_gradient(b)
    adv, w = learner.advantages(b).clamp(-5, 5), learner.row_weights(b)
    cond = {k: v.repeat_interleave(12, 0) for k, v in b.cond.items()}
    lp = transition_log_probs(learner.policy.velocity, b.latents[:, 0], b.next_latents[:, 0], b.sigmas[:, 0],
                              b.sigmas_next[:, 0], cond, eta=ETA)
    (-(w * adv * lp).mean()).backward()
    by_hand = torch.cat([p.grad.flatten() for p in learner.params])
    torch.testing.assert_close(grad, by_hand, rtol=1e-4, atol=1e-7)
    unweighted = make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}, branching="tempflow")
    unweighted.row_weights = lambda batch: None
    assert not torch.allclose(unweighted.policy_gradient(b), grad, rtol=1e-3)  # the weights matter


def test_tempflow_first_update_is_on_policy(tempflow_batch):
    learner = make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}, branching="tempflow")
    stats = learner.update(tempflow_batch)
    assert stats["first_ratio_dev"] < 1e-5 and stats["trained_steps"] == [1, 2, 3] and stats["images_scored"] == 24
    assert stats["num_updates"] == 3 and stats["grad_norm"] > 0


# ------------------------------------------------------------------------------------------------ G²RPO
@pytest.fixture(scope="module")
def granular_batch():
    return two_reward_worker("granular", granularities=[1, 3]).rollout(0, (0, 2), PROMPTS[:2], [0, 1])


def test_granular_rewards_per_grid_and_integrated_advantages_written_out(granular_batch):
    b = granular_batch
    assert b.num_rows == 16 and b.rewards["verifier"].shape == (16, 2) and b.branches == 2
    learner = make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}, branching="granular")
    total = np.zeros((4, 4))
    for name in ("verifier", "bright"):
        for j in range(2):
            r = b.rewards[name][:, j].numpy().reshape(4, 4)  # (prompt, step) groups of 4 children
            total += (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-8)
    assert learner.advantages(b).numpy() == pytest.approx(np.clip(total, -5, 5).flatten(), rel=1e-5, abs=1e-5)
    # the two grids finish the same children differently: a different image for some child at step 0
    grid1, grid3 = (granularity_grid(sigma_schedule(8, 3.0), 0, j) for j in (1, 3))
    assert len(grid1) == 8 and len(grid3) == 4


def test_granular_micro_batches_hold_one_step_each(granular_batch):
    """Rows ordered by SDE step (shuffled within it): with micro_batch × accumulation = prompts × children each
    optimizer step trains one k, as the reference steps once per k."""
    learner = make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}, branching="granular",
                           micro_batch_size=4, gradient_accumulation_steps=2)
    seen = []
    original = learner._forward_backward

    def spy(batch, cond, rows, *a, **k):
        seen.append(sorted(set(batch.steps[rows.cpu()].tolist())))
        return original(batch, cond, rows, *a, **k)

    learner._forward_backward = spy
    stats = learner.update(granular_batch)
    assert seen == [[0], [0], [1], [1]] and stats["num_updates"] == 2 and stats["first_ratio_dev"] < 1e-5
    assert stats["images_scored"] == 32 and stats["trained_steps"] == [0, 1]


# ------------------------------------------------------------------------------------------------ checks
def test_branched_batches_reach_only_branched_learners(tempflow_batch):
    with pytest.raises(ValueError, match="branched rollout batch"):
        make_learner(small_policy(), reward_weights={"verifier": 1.0, "bright": 1.0}).advantages(tempflow_batch)
    with pytest.raises(ValueError, match="branching"):
        make_learner(small_policy(), branching="granular", objective="awm",
                     matching=MatchingSpec(kind="awm", times=2, num_steps=8, shift=3.0))
    with pytest.raises(ValueError, match="final latents"):
        make_worker(small_policy(), branching="tempflow", keep_final=True)


@pytest.mark.parametrize("overrides, field", [
    (["sampler.post_window=dpm", "sampler.compress_ratio=0.4"], "sampler.post_window=euler"),
    (["grpo.train_fraction=0.5"], "grpo.train_fraction=1"),
    (["rollout.batch_size=96"], "grpo.group_size × window.size"),
    (["sampler.branching=none"], "sampler.branching=tempflow"),
])
def test_tempflow_config_refusals(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("×", ".").replace("(", r"\(")):
        load_config(["tempflow_grpo"], overrides)


def test_granular_config_refusals():
    with pytest.raises(ConfigError, match="granularities only applies"):
        load_config([], ["sampler.granularities=[1, 3]"])
    with pytest.raises(ConfigError, match="grpo.objective=grpo"):
        load_config(["g2rpo"], ["grpo.objective=awm"])
    with pytest.raises(ConfigError, match="distinct integers"):
        load_config(["g2rpo"], ["sampler.granularities=[2, 2]"])
    cfg = load_config(["g2rpo"], [])
    assert cfg.num_groups == 2 and cfg.rows_per_prompt == 96
    assert cfg.learner.micro_batch_size * cfg.learner.gradient_accumulation_steps == 2 * cfg.grpo.group_size
