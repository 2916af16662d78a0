"""TempFlow-GRPO and G²RPO through the same driver, Serve rewards and weight broadcast as MixGRPO: branched rollouts
sharded across two workers and merged, per-row σ and per-grid rewards crossing the object store, the Ray run equal
to the in-process run (statistics and final weights), sync and async."""

from __future__ import annotations

import pytest

from learner.driver.loop import run_loop
from tests.integration.conftest import shared_reward_service
from tests.integration.test_faults import assert_same_training, reference_run
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint, train_records  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("preset, async_rollout", [("tempflow_grpo", False), ("g2rpo", True)])
def test_branched_methods_through_ray_equal_the_inprocess_run(ray_cluster, small_checkpoint, tmp_path,  # noqa: F811
                                                              preset, async_rollout):
    cfg = small_cfg(small_checkpoint, tmp_path, preset, "learner.gradient_accumulation_steps=1",
                    f"run.async_rollout={str(async_rollout).lower()}", *(["run.iterations=3", "learner.checkpoint_every=0"] if async_rollout else []))
    assert cfg.num_groups == 2 and cfg.rows_per_prompt == 8  # 2 window steps × 4 children per prompt
    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, f"t-{preset}")
    recs = train_records(tmp_path)
    n = cfg.run.iterations
    assert [r["weight_version"] for r in recs] == list(range(1, n + 1))
    assert [r["staleness"] for r in recs] == ([0] + [1] * (n - 1) if async_rollout else [0] * n)
    assert recs[0]["first_ratio_dev"] < 1e-5  # the learner's log-prob of each child's step equals the worker's
    assert all(r["trained_steps"] == [0, 1] for r in recs)  # frozen window: branch steps 0 and 1
    # G²RPO scores every child at both granularities; TempFlow once
    assert {r["images_scored"] for r in recs} == {32 if preset == "g2rpo" else 16}
    if preset == "tempflow_grpo":
        assert all(r["kl"] >= 0 for r in recs) and recs[-1]["kl"] > 0  # the preset's KL to the reference
    assert_same_training(recs, *reference_run(cfg), tmp_path / "checkpoints" / f"iter_{n - 1:06d}")
