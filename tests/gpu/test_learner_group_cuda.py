"""The learner group on GPUs (`python -m pytest -m gpu`): two FSDP ranks joined over NCCL hold what one learner holds,
and weights go from learner rank 0 straight into the rollout worker's GPU weights over NCCL, checksum-verified.

NCCL refuses two ranks on one device, so these need two GPUs (one per rank); on a one-GPU machine they are skipped
with that reason. The same code runs on the CPU over gloo in tests/integration/test_learner_group.py."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from learner.driver.actors import LearnerActor
from learner.driver.build import build_learner, build_worker
from learner.driver.loop import run_loop
from reward_servers.client import LocalRewards
from reward_servers.service import reward_service
from tests.gpu.test_cuda import PROMPTS, gpu_cfg
from tests.integration.test_policies_diffusers import sd3_dir  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: two GPUs")]


def test_two_fsdp_ranks_on_two_gpus_hold_what_one_learner_holds(ray_cluster, sd3_dir, tmp_path):  # noqa: F811
    cfg = gpu_cfg(sd3_dir, tmp_path, "model.lora_rank=0", "grpo.kl_beta=0", "learner.num_workers=2",
                  "learner.sharding=fsdp", "learner.num_gpus=1", "rollout.num_gpus=1")
    worker = build_worker(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    one = build_learner(cfg)
    worker.sync_weights(one.get_weights())
    batches = [worker.rollout(m, (m, m + 2), PROMPTS, [0, 1, 2, 3]) for m in range(2)]
    expected = [one.update(b) for b in batches]
    reference = {k: v.float().cpu() for k, v in one.trainable_state().items()}
    del one, worker
    torch.cuda.empty_cache()
    ranks = [LearnerActor.options(num_gpus=1, num_cpus=0.5).remote(cfg.model_dump_json(), r) for r in range(2)]
    try:
        address = ray.get(ranks[0].channel_address.remote())
        ray.get([r.join_group.remote(address, 2) for r in ranks])
        for b, exp in zip(batches, expected, strict=True):
            got = ray.get([r.update.remote(b, num_groups=4) for r in ranks])
            assert got[0]["num_updates"] == exp["num_updates"] and got[0]["grad_norm"] == got[1]["grad_norm"]
            assert got[0]["grad_norm"] == pytest.approx(exp["grad_norm"], rel=2e-2)  # bf16 autocast, other order
        packets = ray.get([r.get_weights.remote() for r in ranks])
    finally:
        for r in ranks:
            ray.kill(r)
    assert packets[1] is None and packets[0].version == 2
    moved = [k for k, v in reference.items() if not torch.allclose(packets[0].state[k].float(), v, rtol=2e-2, atol=2e-3)]
    assert not moved, moved[:5]


def test_nccl_weight_sync_from_learner_rank_0_into_the_worker_gpu(ray_cluster, sd3_dir, tmp_path):  # noqa: F811
    cfg = gpu_cfg(sd3_dir, tmp_path, "cluster.collective_backend=nccl", "learner.num_gpus=1", "rollout.num_gpus=1")
    with reward_service(cfg.reward):
        run_loop(cfg, tmp_path / "run", "t-nccl")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["weight_version"] for r in train] == [1, 2]  # each NCCL broadcast verified by version and checksum
    assert all(r["first_ratio_dev"] < 1e-3 for r in train)
