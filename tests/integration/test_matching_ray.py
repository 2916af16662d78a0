"""AWM and DiffusionNFT through the same driver, Serve rewards and weight broadcast as MixGRPO: the Ray run equals the
in-process run (statistics and final weights), and async mode runs with staleness 1."""

from __future__ import annotations

import math

import pytest

from learner.driver.loop import run_loop
from tests.integration.conftest import shared_reward_service
from tests.integration.test_faults import assert_same_training, reference_run
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint, train_records  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("preset,objective", [("awm", "awm"), ("diffusion_nft", "nft")])
def test_matching_objectives_through_ray_equal_the_inprocess_run(ray_cluster, small_checkpoint, tmp_path,  # noqa: F811
                                                                  preset, objective):
    cfg = small_cfg(small_checkpoint, tmp_path, preset)
    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, f"t-{preset}")
    recs = train_records(tmp_path)
    assert [r["objective"] for r in recs] == [objective] * 2 and [r["weight_version"] for r in recs] == [1, 2]
    assert all(len(r["trained_steps"]) == 6 and r["grad_norm"] > 0 for r in recs)  # 6 time draws per micro-batch
    assert_same_training(recs, *reference_run(cfg), tmp_path / "checkpoints" / "iter_000001")


def test_nft_async(ray_cluster, small_checkpoint, tmp_path):  # noqa: F811
    """Async: the rollout of m+1 samples with φ before update m (staleness 1); the matching objectives need no
    ratio correction. (AWM's async path is the same driver code.)"""
    cfg = small_cfg(small_checkpoint, tmp_path, "diffusion_nft", "run.async_rollout=true", "run.iterations=3",
                    "learner.checkpoint_every=0")
    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, "t-nft-async")
    recs = train_records(tmp_path)
    assert [r["staleness"] for r in recs] == [0, 1, 1] and all(math.isfinite(r["loss"]) for r in recs)
