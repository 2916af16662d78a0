"""The Flow-GRPO baseline's credit as its reference forms it (yifan123/flow_grpo: scripts/train_sd3.py,
config/grpo.py, flow_grpo/stat_tracking.py): each prompt's mean, the whole batch's population std + 1e-4
(`global_std=True`), on the weighted sum of the rewards; a KL term of β = 0.04 (GenEval / OCR configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.algo import combine_advantages, global_std_advantages, group_advantages
from learner.algo.family import batch_std_advantages
from learner.training.credit import batch_advantages
from services.config import ConfigError, load_config
from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_global_std(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """The reference's per-prompt tracker with a global std, in numpy: (R − mean of its prompt) / (std R + 1e-4)."""
    prompts, out = np.array(prompts), np.empty_like(rewards)
    for p in np.unique(prompts):
        out[prompts == p] = (rewards[prompts == p] - rewards[prompts == p].mean()) / (np.std(rewards) + 1e-4)
    return out


def test_global_std_worked_example():
    # groups (1, 2, 3) and (5, 5, 8): batch mean 4, population variance (9+4+1+1+1+16)/6 = 16/3, std 2.3094011
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    scale = (16 / 3) ** 0.5 + 1e-4
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]) / scale  # ±0.432994, 0; …, 0.865988
    torch.testing.assert_close(global_std_advantages(r), expected)
    assert float(global_std_advantages(r)[1, 2]) == pytest.approx(0.865988, abs=1e-6)
    got = reference_global_std(["a", "a", "a", "b", "b", "b"], r.double().numpy().ravel())
    np.testing.assert_allclose(global_std_advantages(r).numpy().ravel(), got, rtol=1e-6)
    # a group of nearly equal rewards keeps small advantages (its own std would blow them up to ±1)
    near = torch.tensor([[0.0, 1.0, 0.5], [0.50, 0.51, 0.52]])
    assert float(global_std_advantages(near)[1].abs().max()) < 0.05
    assert float(group_advantages(near)[1].abs().max()) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(batch_std_advantages(r), expected)  # AWM's scaling is the same (clipped at ±5)


def test_the_reference_on_random_batches_and_the_reward_sum():
    gen = np.random.default_rng(0)
    a, b = gen.random((6, 12)), gen.random((6, 12))  # 6 prompts × 12 images, two rewards
    prompts = [f"p{i}" for i in range(6) for _ in range(12)]
    out = combine_advantages({"a": torch.tensor(a), "b": torch.tensor(b)}, {"a": 1.0, "b": 3.0},
                             aggregation="reward", std="global")
    expected = reference_global_std(prompts, (0.25 * a + 0.75 * b).ravel())  # `multi_score`'s avg, weights /4
    np.testing.assert_allclose(out.numpy().ravel(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown std"):
        combine_advantages({"a": torch.tensor(a)}, {"a": 1.0}, std="batch")


def test_the_preset_is_the_reference_config_and_the_learner_reads_it():
    cfg = load_config(["flow_grpo"])
    assert (cfg.grpo.advantage_std, cfg.grpo.reward_aggregation, cfg.grpo.kl_beta) == ("global", "reward", 0.04)
    assert load_config(["mixgrpo"]).grpo.advantage_std == "group"
    batch = make_worker(small_policy()).rollout(0, (0, 3), PROMPTS, [0, 1, 2, 3])
    learner = make_learner(small_policy(), advantage_std="global")
    r = batch.rewards["verifier"].view(4, -1)
    torch.testing.assert_close(learner.advantages(batch), global_std_advantages(r).flatten())
    torch.testing.assert_close(batch_advantages(batch, {"verifier": 1.0}), group_advantages(r).flatten())


def test_global_std_with_another_objective_names_the_field():
    for overrides in (["grpo.objective=awm"], ["sampler.branching=tempflow", "sampler.group_noise=shared", "window.size=2"]):
        with pytest.raises(ConfigError, match="grpo.advantage_std=global"):
            load_config(["flow_grpo"], overrides)
