"""A K-rank learner on a local Ray (gloo on the CPU): data parallel and FSDP ranks compute what one learner computes
on the same global batch, a 2-rank run resumes exactly (on 2 ranks, then on 1), and `python learner/main.py
learner.num_workers=2` runs with every weight broadcast verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from learner.driver.actors import LearnerActor
from learner.driver.build import build_learner, build_worker
from learner.driver.loop import run_loop
from reward_servers.client import LocalRewards
from services.broadcast import weights_checksum
from tests.integration.conftest import shared_reward_service
from tests.integration.test_faults import assert_same_training, reference_run
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint, train_records  # noqa: F401
from tests.redis_server import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def group_cfg(ckpt, out, *extra):
    return small_cfg(ckpt, out, "mixgrpo", "learner.num_workers=2", "learner.gradient_accumulation_steps=2",
                     "learner.micro_batch_size=4", "learner.num_cpus=0.25", *extra)


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_ranks_hold_what_one_learner_holds_after_two_updates(ray_cluster, small_checkpoint, tmp_path,  # noqa: F811
                                                                 sharding):
    extra = ["model.lora_rank=0"] + (["learner.sharding=fsdp"] if sharding == "fsdp" else [])
    cfg = group_cfg(small_checkpoint, tmp_path, *extra)
    torch.set_num_threads(1)
    worker = build_worker(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    one = build_learner(cfg)  # one process, the same global batches
    worker.sync_weights(one.get_weights())
    batches = [worker.rollout(m, (m, 2), ["a red circle", "two blue squares", "a green triangle",
                                          "three cyan circles"], [0, 1, 2, 3]) for m in range(2)]
    expected = [one.update(b) for b in batches]
    ranks = [LearnerActor.options(num_cpus=0.25).remote(cfg.model_dump_json(), r) for r in range(2)]
    try:
        address = ray.get(ranks[0].channel_address.remote())
        ray.get([r.join_group.remote(address, 2) for r in ranks])
        for b, exp in zip(batches, expected, strict=True):
            got = ray.get([r.update.remote(b, num_groups=4) for r in ranks])
            assert got[0]["num_updates"] == exp["num_updates"] == 2  # 16 rows, 4 × 2 (accumulation) per step
            for k in ("grad_norm", "ratio_min", "ratio_max", "first_ratio_dev"):
                assert got[0][k] == pytest.approx(exp[k], rel=1e-4, abs=1e-7), k
            assert got[0]["grad_norm"] == got[1]["grad_norm"]  # every rank clipped the same global gradient
            # the ranks' computed rows (the group's first window step shared in each micro-batch) add up to one's
            assert got[0]["forward_rows"] == got[1]["forward_rows"] == exp["forward_rows"] < exp["trained_sample_steps"]
        packets = ray.get([r.get_weights.remote() for r in ranks])
    finally:
        for r in ranks:
            ray.kill(r)
    assert packets[1] is None and packets[0].version == 2
    for k, v in one.trainable_state().items():
        torch.testing.assert_close(packets[0].state[k], v, rtol=1e-5, atol=1e-6)
    # FSDP: the checksum is the fingerprint the ranks took of their shards, and it is the gathered state's
    assert packets[0].checksum == weights_checksum(packets[0].state, "fp" if sharding == "fsdp" else "b2")


def test_a_two_rank_run_resumes_exactly_on_two_ranks_then_on_one(ray_cluster, small_checkpoint, tmp_path):  # noqa: F811
    """Two ranks for 1 iteration, --resume to 2 on two ranks, then to 3 on one rank (a K-rank checkpoint on K'
    ranks): the in-process run of 3 iterations, record for record and weight for weight."""
    cfg = group_cfg(small_checkpoint, tmp_path, "run.iterations=1")

    def more(iterations, ranks):
        return cfg.model_copy(update={"run": cfg.run.model_copy(update={"iterations": iterations}),
                                      "learner": cfg.learner.model_copy(update={"num_workers": ranks})})

    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, "t-group")
        run_loop(more(2, 2), tmp_path, "t-group", resume=True)
        run_loop(more(3, 1), tmp_path, "t-group", resume=True)
    recs = train_records(tmp_path)
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert_same_training(recs, *reference_run(more(3, 1)), tmp_path / "checkpoints" / "iter_000002")


@pytest.mark.slow  # (two ranks through run_loop: test_a_two_rank_run_resumes_exactly_on_two_ranks_then_on_one)
def test_main_with_two_learner_ranks(small_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [f"model.path={small_checkpoint}", f"run.output_dir={out}", "learner.num_workers=2",
            "learner.gradient_accumulation_steps=2", "learner.micro_batch_size=8", "learner.num_cpus=0.25",
            "rollout.num_cpus=0.25", "rollout.batch_size=16", "grpo.group_size=4", "sampler.num_steps=6",
            "window.size=2", "window.shift_interval=1", "run.iterations=2", "run.eval_every=0", "run.eval_prompts=4",
            "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1}]", "cluster.num_cpus=2", "cluster.dashboard=false",
            f"reward.server.port={free_port()}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "learner/main.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["weight_version"] for r in train] == [1, 2]  # every broadcast checked against rank 0's version
    assert all(r["first_ratio_dev"] < 1e-5 for r in train) and all(r["num_updates"] == 1 for r in train)  # 16 rows = 8 × 2, one micro-batch per rank
