"""The distributed trainer on a local Ray: every method for two iterations, the window advancing,
workers receiving every weight version, ratio = 1 across processes, and exact resume."""

import json
import shutil

import pytest
import torch

from learner.driver.loop import run_loop
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy
from services.config import load_config
from tests.integration.conftest import shared_reward_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_hidden_size=32,
                                      text_layers=1, text_heads=2, text_intermediate_size=64)
    TinyPolicy.from_config(cfg, seed=0).save(path)
    return path


def small_cfg(ckpt, out, preset=None, *extra):
    overrides = [
        f"model.path={ckpt}", f"run.output_dir={out}", "sampler.num_steps=6", "window.size=2",
        "window.shift_interval=1", "grpo.group_size=4", "rollout.batch_size=16", "rollout.num_workers=2",
        "rollout.num_cpus=0.25", "learner.num_cpus=0.25", "learner.micro_batch_size=8", "run.eval_every=0",
        "run.eval_prompts=4", "reward.rewards=[{name: shapes_verifier, num_cpus: 0.1}]", "learner.checkpoint_every=1",
        "run.iterations=2", "learner.lr=1e-3", *extra,
    ]
    if preset in ("flow_grpo", "dance_grpo"):
        overrides = [o for o in overrides if not o.startswith("window.size")]
    return load_config([preset] if preset else [], overrides)


def train_records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("preset", ["mixgrpo", pytest.param("mixgrpo_flash", marks=pytest.mark.slow),
                                    "mixgrpo_flash_star", "flow_grpo", "dance_grpo", "flow_grpo_fast"])
# (slow: the same code paths as their neighbours; flow_grpo's members each start from their own noise)
def test_two_iterations_of_each_method(ray_cluster, small_checkpoint, tmp_path, preset):
    cfg = small_cfg(small_checkpoint, tmp_path, preset)
    with shared_reward_service(cfg.reward):
        result = run_loop(cfg, tmp_path, f"t-{preset}")
    recs = train_records(tmp_path)
    assert [r["iteration"] for r in recs] == [0, 1]
    for r in recs:
        assert r["first_ratio_dev"] < 1e-5  # on-policy across processes: worker and learner agree
        assert r["weight_version"] == r["iteration"] + 1 and r["staleness"] == 0
        assert 0.0 <= r["reward_mean"] <= 1.0 and "iteration_seconds" in r
    starts = [r["window_start"] for r in recs]
    if preset in ("mixgrpo", "mixgrpo_flash"):
        assert starts == [0, 1]  # progressive, τ = 1
    elif preset == "flow_grpo_fast":
        assert all(0 <= s <= 6 - 1 - 2 for s in starts) and {r["window_size"] for r in recs} == {2}  # random, w = 2
    else:
        assert starts == [0, 0]
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [e["iteration"] for e in evals] == [-1, 1] and result["final_eval"]["eval_verifier_score"] >= 0


def full_and_resumed(small_checkpoint, tmp_path, n, k, tag, *overrides):
    """An n-iteration run beside a k-iteration run resumed to n: (their train records, their final weights)."""
    from learner.training import load_checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    cfg_full = small_cfg(small_checkpoint, full, "mixgrpo", f"run.iterations={n}", *overrides)
    cfg_part = small_cfg(small_checkpoint, part, "mixgrpo", f"run.iterations={k}", *overrides)
    with shared_reward_service(cfg_full.reward):
        run_loop(cfg_full, full, f"t-{tag}full")
        run_loop(cfg_part, part, f"t-{tag}part")
        cfg_more = cfg_part.model_copy(update={"run": cfg_part.run.model_copy(update={"iterations": n})})
        run_loop(cfg_more, part, f"t-{tag}part", resume=True)
    last = f"iter_{n - 1:06d}"
    return (train_records(full), train_records(part)), (load_checkpoint(full / "checkpoints" / last)[0],
                                                       load_checkpoint(part / "checkpoints" / last)[0])


def assert_same_weights(wa, wb):
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_async_mode_has_staleness_one(ray_cluster, small_checkpoint, tmp_path):
    cfg = small_cfg(small_checkpoint, tmp_path, "mixgrpo", "run.async_rollout=true", "run.iterations=3",
                    "learner.overlap_threads=1", "learner.checkpoint_every=0")  # (a checkpoint is a sync point)
    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, "t-async")
    recs = train_records(tmp_path)
    assert [r["staleness"] for r in recs] == [0, 1, 1]
    # the wait for the overlapping rollout is its own phase, not the broadcast's; the last update overlaps none
    assert recs[0]["next_rollout_wait_s"] >= 0 and recs[2]["next_rollout_wait_s"] == 0.0
    assert recs[0]["first_ratio_dev"] < 1e-5 and recs[1]["first_ratio_dev"] > 1e-5  # stale: corrected by π_old
    # two micro-batches per update; the threads rise when the next rollout is done, and the last update overlaps none
    assert all(r["overlap_boost_at"] in (-1, 0, 1) for r in recs[:2]) and recs[2]["overlap_boost_at"] == -1


def test_an_async_run_resumes_exactly(ray_cluster, small_checkpoint, tmp_path):
    """Async: the rollout after a checkpointed iteration samples with the checkpoint's weights (staleness 0), as a
    resumed run's first rollout must; before, the uninterrupted run sampled it with the weights before that update
    and the resumed one could not (iteration 2's rewards and the final evaluation differed)."""
    (a, b), (wa, wb) = full_and_resumed(small_checkpoint, tmp_path, 4, 2, "a", "run.async_rollout=true",
                                        "learner.checkpoint_every=2", "run.eval_every=0")
    assert [r["staleness"] for r in a] == [r["staleness"] for r in b] == [0, 1, 0, 1]
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], abs=1e-6)
    assert_same_weights(wa, wb)


def test_learner_actor_takes_the_rollout_cores_once_the_overlapping_shards_are_done(ray_cluster, small_checkpoint,
                                                                                   tmp_path):
    import ray

    from learner.driver.actors import LearnerActor
    from learner.driver.build import build_worker
    from reward_servers.client import LocalRewards

    cfg = small_cfg(small_checkpoint, tmp_path, "mixgrpo", "run.async_rollout=true")
    worker = build_worker(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    batch = worker.rollout(0, (0, 2), ["a red circle", "two blue squares", "a green triangle", "three cyan circles"],
                           [0, 1, 2, 3])  # 16 rows: two micro-batches of 8

    @ray.remote(num_cpus=0)
    def still_sampling():
        import time

        time.sleep(600)

    learner = LearnerActor.options(num_cpus=0.25).remote(cfg.model_dump_json())
    pending = still_sampling.remote()
    try:
        waiting = ray.get(learner.update.remote(batch, num_groups=4, overlap=([pending], 1)))
        finished = ray.get(learner.update.remote(batch, num_groups=4, overlap=([ray.put(0)], 1)))
        plain = ray.get(learner.update.remote(batch, num_groups=4))
    finally:
        ray.cancel(pending, force=True)
        ray.kill(learner)
    assert (waiting["overlap_boost_at"], waiting["overlap_boost_frac"]) == (-1, 0.0)  # never done: never raised
    # done: from the first micro-batch, or the second if the actor had not yet heard from the ref's owner
    assert (finished["overlap_boost_at"], finished["overlap_boost_frac"]) in ((0, 1.0), (1, 0.5))
    assert (plain["overlap_boost_at"], plain["overlap_boost_frac"]) == (-1, 0.0)  # sync: nothing to overlap


@pytest.mark.slow  # (resume exactness also: test_learner_group.py's 2 → 2 → 1 ranks, test_learner_fault.py's replay)
def test_resume_continues_exactly(ray_cluster, small_checkpoint, tmp_path):
    (a, b), (wa, wb) = full_and_resumed(small_checkpoint, tmp_path, 3, 2, "")
    assert [r["window_start"] for r in a] == [r["window_start"] for r in b]
    assert [r["iteration"] for r in b] == [0, 1, 2]
    assert_same_weights(wa, wb)


def test_collective_weight_sync_gloo(ray_cluster, small_checkpoint, tmp_path):
    cfg = small_cfg(small_checkpoint, tmp_path, "mixgrpo", "cluster.weight_sync=collective")
    with shared_reward_service(cfg.reward):
        run_loop(cfg, tmp_path, "t-gloo")
    recs = train_records(tmp_path)
    assert [r["weight_version"] for r in recs] == [1, 2]
    assert all(r["first_ratio_dev"] < 1e-5 for r in recs)  # workers sampled with exactly the broadcast weights


@pytest.mark.parametrize("store", ["file", pytest.param("redis", marks=pytest.mark.slow)])  # (redis: unit-tested too)
def test_resume_after_a_crash_past_the_last_checkpoint_with_a_persistent_window_store(
        ray_cluster, small_checkpoint, tmp_path, store):
    """The window store follows the checkpoint: a run that got to iteration 3 but checkpointed last at 1 (the
    crash is simulated by deleting iteration 3's checkpoint) resumes at 2 although its file / Redis store says 3,
    and ends with the windows, statistics and weights of an uninterrupted run (the in-process reference)."""
    from contextlib import nullcontext

    from tests.integration.test_faults import assert_same_training, reference_run
    from tests.redis_server import redis_server

    part = tmp_path / "part"
    with redis_server(tmp_path) if store == "redis" else nullcontext(f"file://{tmp_path / 'state'}") as url:
        cfg = small_cfg(small_checkpoint, part, "mixgrpo", "run.iterations=4", "learner.checkpoint_every=2",
                        f"cluster.state_store={url}")
        with shared_reward_service(cfg.reward):
            run_loop(cfg, part, f"t-part-{store}")
            shutil.rmtree(part / "checkpoints" / "iter_000003")
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"iterations": 3})})
            run_loop(cfg, part, f"t-part-{store}", resume=True)
    recs = train_records(part)
    assert [r["iteration"] for r in recs] == [0, 1, 2] and [r["window_start"] for r in recs] == [0, 1, 2]
    assert_same_training(recs, *reference_run(cfg), part / "checkpoints" / "iter_000002")


def test_actors_keep_freed_memory(ray_cluster, small_checkpoint, tmp_path, monkeypatch):
    """The rollout and learner actors start with glibc's trim/mmap thresholds raised (the page faults of
    benchmarks/results/compare_methods_paper_history.md); a value set in the driver's environment wins over the default."""
    import os

    import ray

    from learner.driver.loop import ACTOR_MALLOC_ENV, malloc_runtime_env, start_actors, stop_actors

    assert malloc_runtime_env({}) == {"env_vars": ACTOR_MALLOC_ENV}
    assert malloc_runtime_env({"MALLOC_TRIM_THRESHOLD_": "7"})["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == "7"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    cfg = small_cfg(small_checkpoint, tmp_path / "run")
    with shared_reward_service(cfg.reward):
        cl = start_actors(cfg, "malloc-env")
        try:
            seen = ray.get([a.__ray_call__.remote(
                lambda self: (os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_")))
                for a in [*cl.workers, *cl.learners]])
        finally:
            stop_actors(cl)
    assert seen == [("1048576", ACTOR_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"])] * (cfg.rollout.num_workers + 1)


def test_batches_and_weights_cross_an_actor_boundary_whole_and_writable(ray_cluster):
    """Through a real actor and Ray's own serializer (which calls the `__reduce__` of services/wire.py; the unit
    tests show the bytes go out of band): a rollout batch and a weight packet arrive bit for bit, as tensors the
    receiver owns and may write to, and come back the same way."""
    import ray

    from services.broadcast import WeightPacket, verify_loaded
    from tests.unit.test_wire import make_batch, same_bits

    @ray.remote(num_cpus=0.1)
    class Echo:
        def touch(self, batch, packet):
            batch.log_probs.add_(1.0)  # writable on the receiving side
            packet.state["w"].mul_(2.0)
            return batch, packet

    batch = make_batch(True)
    packet = WeightPacket.build(3, {"w": torch.randn(32, 32), "b": torch.randn(8).bfloat16()})
    echo = Echo.remote()
    back, moved = ray.get(echo.touch.remote(ray.put(batch), ray.put(packet)))
    assert same_bits(back.log_probs, batch.log_probs + 1.0) and same_bits(back.latents, batch.latents)
    assert same_bits(moved.state["w"], packet.state["w"] * 2.0) and same_bits(moved.state["b"], packet.state["b"])
    verify_loaded(packet, {**moved.state, "w": moved.state["w"] / 2.0}, 3)
    ray.kill(echo)
