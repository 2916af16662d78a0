"""benchmarks/experiments/reward_retrain.py, the learned-reward lever screened for issue 17: ρ is taken against the
verifier on the same fresh samples for every reward, and sample sets join in order."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.experiments.reward_retrain import main, rho_table
from reward_servers.scorers.shapes_reward_model import merge_datasets
from rollout_workers.policies.tiny import TinyPolicy
from services import shapes_world

pytestmark = pytest.mark.usefixtures("one_thread")


def verifier(images, prompts):
    return np.array([shapes_world.verify(p, im).score for p, im in zip(prompts, images, strict=True)])


def test_rho_is_one_for_the_verifier_minus_one_for_its_negation_and_matches_a_hand_rank_correlation():
    policy = TinyPolicy.load("rollout_workers/assets/tiny_policy")
    rng = np.random.default_rng(0)
    noisy = {}

    def noisy_verifier(images, prompts):  # a reward that tracks the verifier loosely; keep its scores
        noisy["scores"] = verifier(images, prompts) + rng.normal(0, 0.3, len(prompts))
        noisy["targets"] = verifier(images, prompts)
        return noisy["scores"]

    table = rho_table({"same": verifier, "negated": lambda i, p: -verifier(i, p), "noisy": noisy_verifier},
                      {"base": policy}, n=16, seed=3)
    assert table["base"]["same"] == pytest.approx(1.0)
    assert table["base"]["negated"] == pytest.approx(-1.0)

    def ranks(a):  # average ranks of ties, written out
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):
            r[a == v] = r[a == v].mean()
        return r

    rs, rt = ranks(noisy["scores"]), ranks(noisy["targets"])
    expected = float(np.corrcoef(rs, rt)[0, 1])
    assert table["base"]["noisy"] == pytest.approx(expected, abs=1e-9)
    assert -1.0 < expected < 1.0


def test_sample_sets_join_in_order_and_an_empty_join_or_too_few_samples_is_refused():
    a = {"images": np.zeros((2, 32, 32, 3), np.uint8), "prompts": ["x", "y"], "targets": np.array([0.1, 0.2]),
         "kinds": ["policy"] * 2}
    b = {"images": np.ones((1, 32, 32, 3), np.uint8), "prompts": ["z"], "targets": np.array([0.3]), "kinds": ["policy"]}
    joined = merge_datasets([a, b])  # what the experiment's `train` joins the policies' samples with
    assert joined["prompts"] == ["x", "y", "z"] and joined["images"].shape == (3, 32, 32, 3)
    assert joined["targets"].dtype == np.float32
    np.testing.assert_array_equal(joined["targets"], np.float32([0.1, 0.2, 0.3]))
    assert joined["kinds"] == ["policy"] * 3
    assert joined["images"][2].max() == 1
    with pytest.raises(ValueError, match="no sample sets"):
        merge_datasets([])
    with pytest.raises(SystemExit):
        main(["train", "--out", "/nonexistent", "--policies", "a", "b", "--policy-samples", "1"])
