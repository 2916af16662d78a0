"""RolloutWorker + Learner as plain classes (no Ray): fp32 transitions, ratio = 1 at the first update,
seeding independent of sharding, weight sync verified, checkpoints that refuse corruption."""

import numpy as np
import pytest
import torch

from learner.training import CheckpointError, Learner, load_checkpoint, trained_steps
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy
from rollout_workers.worker import RolloutWorker
from services import shapes_world
from services.broadcast import WeightPacket, WeightSyncError, verify_loaded
from services.types import merge_batches

G = 4


class Done:
    def __init__(self, v):
        self.v = v

    def result(self):
        return self.v


class VerifierSink:
    """In-process reward: the shapes verifier's partial-credit score."""

    def __init__(self):
        self.calls = 0

    def submit(self, name, images, prompts):
        self.calls += 1
        return Done(np.array([shapes_world.verify(p, im).score for p, im in zip(prompts, images)], np.float32))


def small_policy(seed=0):
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64)
    return TinyPolicy.from_config(cfg, seed=seed)


def make_worker(policy, **kw):
    args = dict(num_steps=8, shift=3.0, eta=0.7, sde_kind="flow", post_window="euler", compress_ratio=1.0,
                group_size=G, seed=3, chunk_groups=2, log_images=2)
    return RolloutWorker(policy, VerifierSink(), ["verifier"], **(args | kw))


def make_learner(policy, **kw):
    args = dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_size=4,
                gradient_accumulation_steps=2, clip_range=1e-4, adv_clip_max=5.0, reward_weights={"verifier": 1.0},
                reward_aggregation="advantage", train_fraction=1.0, num_inner_epochs=1, eta=0.7, sde_kind="flow",
                seed=3)
    return Learner(policy, **(args | kw))


def assert_same_update(start, a, b, rel=1e-3) -> None:
    """Two updates of the same starting weights agree, per tensor: |Δa − Δb| ≤ rel·|Δa| (and something moved).
    Not element-wise: Adam turns fp32 order-of-summation noise in a small gradient into a step of order lr, as in the
    refiner's first layers while its zero-initialised last layer is still small."""
    moved = 0.0
    for name, s in start.items():
        da, db = a[name] - s, b[name] - s
        assert (da - db).norm() <= rel * da.norm(), (name, float((da - db).norm()), float(da.norm()))
        moved += float(da.norm())
    assert moved > 0


PROMPTS = ["a red square", "two blue circles", "a green triangle left of a white square", "three yellow squares"]


def test_rollout_batch_is_fp32_and_sharding_does_not_change_it():
    worker = make_worker(small_policy())
    whole = worker.rollout(0, (2, 3), PROMPTS, [0, 1, 2, 3])
    assert whole.latents.shape == (4 * G, 3, 3, 32, 32) and whole.latents.dtype == torch.float32
    assert whole.log_probs.shape == (4 * G, 3) and whole.rewards["verifier"].shape == (4 * G,)
    assert whole.cond["input_ids" if "input_ids" in whole.cond else next(iter(whole.cond))].shape[0] == 4
    assert worker.rewards.calls == 2  # one scoring call per chunk of 2 groups, submitted as each chunk finished
    parts = [worker.rollout(0, (2, 3), PROMPTS[2:], [2, 3]), worker.rollout(0, (2, 3), PROMPTS[:2], [0, 1])]
    merged = merge_batches(parts)
    assert merged.prompts == PROMPTS
    # the workers run side by side: the merged seconds are the slowest shard's, the CPU seconds their sum
    assert merged.timings["rollout_s"] == max(b.timings["rollout_s"] for b in parts)
    assert merged.timings["cpu_s"] == pytest.approx(sum(b.timings["cpu_s"] for b in parts)) and all(
        b.timings["cpu_s"] > 0 for b in parts)
    # the model's forward seconds: the slowest worker's, and their sum (the gap is the workers' imbalance)
    assert merged.timings["forward_s"] == max(b.timings["forward_s"] for b in parts)
    assert merged.timings["forward_sum_s"] == pytest.approx(sum(b.timings["forward_s"] for b in parts))
    torch.testing.assert_close(merged.next_latents, whole.next_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.rewards["verifier"], whole.rewards["verifier"])
    other_iter = worker.rollout(1, (2, 3), PROMPTS, [0, 1, 2, 3])
    assert not torch.allclose(other_iter.next_latents, whole.next_latents)


def test_logged_rollout_images_keep_their_prompts_and_rewards_through_a_merge():
    """`rollout.log_images`: each worker logs a few images spread over its groups; merged out of order, every
    logged image still names its own prompt and reward (checked against the verifier run on that image again)."""
    worker = make_worker(small_policy(), log_images=3)
    parts = [worker.rollout(0, (2, 3), PROMPTS[2:], [2, 3]), worker.rollout(0, (2, 3), PROMPTS[:2], [0, 1])]
    assert [len(b.images) for b in parts] == [3, 3] and parts[0].image_rows == [0, 2, 5]  # of 8 rows (2 groups)
    merged = merge_batches(parts)
    assert merged.image_rows == [0, 2, 5, 8, 10, 13]  # shard 0's groups 2-3 are rows 8-15 of the merged batch
    assert merged.image_prompts == [PROMPTS[k] for k in (0, 0, 1, 2, 2, 3)]
    samples = merged.logged_samples(4)  # images 0, 1, 3, 4 of the 6
    assert len(samples["images"]) == 4 and samples["prompts"] == [PROMPTS[k] for k in (0, 0, 2, 2)]
    again = [shapes_world.verify(p, im).score for p, im in zip(samples["prompts"], samples["images"])]
    assert samples["rewards"]["verifier"] == pytest.approx(again, abs=1e-6)
    rows = [merged.image_rows[i] for i in (0, 1, 3, 4)]
    assert samples["rewards"]["verifier"] == pytest.approx(merged.rewards["verifier"][rows].tolist())
    assert make_worker(small_policy(), log_images=0).rollout(0, (2, 3), PROMPTS[:2], [0, 1]).logged_samples(4) is None


def test_merge_refuses_lost_or_double_counted_groups():
    worker = make_worker(small_policy())
    a, b = worker.rollout(0, (2, 3), PROMPTS[:2], [0, 1]), worker.rollout(0, (2, 3), PROMPTS[2:], [2, 3])
    assert merge_batches([b, a], num_groups=4).prompt_ids == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"missing \[2, 3\]"):  # a lost shard
        merge_batches([a], num_groups=4)
    with pytest.raises(ValueError, match="duplicate groups"):  # a re-run shard counted next to the original
        merge_batches([a, b, a], num_groups=4)


def test_a_rerun_loads_the_exact_older_weights():
    """A lost shard is re-run with the weights its rollout started with, even on a worker already ahead."""
    worker, old = make_worker(small_policy()), WeightPacket.build(3, small_policy(seed=1).trainable_state_dict())
    first = (worker.load_weights(old), worker.rollout(0, (2, 3), PROMPTS[:2], [0, 1]))
    assert worker.sync_weights(WeightPacket.build(4, small_policy(seed=2).trainable_state_dict())) == 4
    assert worker.load_weights(old) == 3  # back to version 3, checksum-verified
    again = worker.rollout(0, (2, 3), PROMPTS[:2], [0, 1])
    assert first[0] == 3 and torch.equal(again.next_latents, first[1].next_latents)
    torch.testing.assert_close(again.rewards["verifier"], first[1].rewards["verifier"], rtol=0, atol=0)


def test_first_update_ratio_is_one_and_weights_change():
    policy_w, policy_l = small_policy(), small_policy()
    worker, learner = make_worker(policy_w), make_learner(policy_l)
    batch = worker.rollout(0, (1, 4), PROMPTS, [0, 1, 2, 3])
    before = {k: v.clone() for k, v in policy_l.trainable_state_dict().items()}
    stats = learner.update(batch)
    assert stats["first_ratio_dev"] < 1e-6
    assert stats["num_updates"] == 2 and stats["weight_version"] == 1
    assert len(stats["loss_per_step"]) == 4
    after = policy_l.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # broadcast: the worker takes version 1, verified by checksum; an older packet is ignored
    packet = learner.get_weights()
    assert worker.sync_weights(packet) == 1
    assert worker.sync_weights(WeightPacket.build(0, before)) == 1  # older: ignored
    # with identical weights again, recomputed log-probs match the new rollout's exactly
    batch2 = worker.rollout(1, (2, 4), PROMPTS, [0, 1, 2, 3])
    assert learner.update(batch2)["first_ratio_dev"] < 1e-6


def test_guided_rollout_and_update_agree_at_the_first_step():
    """Classifier-free guidance (s = 3) through the whole path: the worker's recorded log-probs are the learner's,
    the negative prompt states travel in the batch's cond, and the update moves the weights."""
    cfg = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64)
    policy_w, policy_l = (TinyPolicy.from_config(cfg, seed=0, guidance_scale=3.0) for _ in range(2))
    batch = make_worker(policy_w).rollout(0, (1, 4), PROMPTS, [0, 1, 2, 3])
    assert {"negative_encoder_hidden_states", "negative_pooled_projections"} <= set(batch.cond)
    learner = make_learner(policy_l)
    before = {k: v.clone() for k, v in policy_l.trainable_state_dict().items()}
    stats = learner.update(batch)
    assert stats["first_ratio_dev"] < 1e-6
    after = policy_l.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_corrupted_packet_is_refused():
    worker = make_worker(small_policy())
    good = WeightPacket.build(5, small_policy(seed=1).trainable_state_dict())
    bad = WeightPacket(5, good.checksum, {k: v + (1.0 if i == 0 else 0.0) for i, (k, v) in enumerate(good.state.items())})
    with pytest.raises(WeightSyncError, match="checksum"):
        worker.sync_weights(bad)


def test_trained_steps_subset_is_seeded():
    assert trained_steps(4, 1.0, 0, 7) == [0, 1, 2, 3]
    sub = trained_steps(15, 0.6, 0, 7)
    assert len(sub) == 9 and sub == trained_steps(15, 0.6, 0, 7) and sub != trained_steps(15, 0.6, 0, 8)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    learner = make_learner(small_policy())
    worker = make_worker(small_policy())
    learner.update(worker.rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3]))
    path = learner.save(str(tmp_path))
    fresh = make_learner(small_policy(seed=9))
    meta = fresh.restore(path)
    assert meta["iteration"] == 0 and fresh.version == 1
    for k, v in learner.policy.trainable_state_dict().items():
        assert torch.equal(v, fresh.policy.trainable_state_dict()[k])
    weights = tmp_path / "iter_000000" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate
    with pytest.raises(CheckpointError, match="weights.safetensors does not match"):
        load_checkpoint(path)
    (tmp_path / "iter_000000" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is corrupted"):
        load_checkpoint(path)



def test_a_weight_packet_is_a_snapshot_of_its_version():
    """Training goes on after a packet is built; the packet must keep (and verify as) its version's bytes."""
    module = torch.nn.Linear(4, 3)  # nn.Module.state_dict() tensors share storage with the parameters
    packet = WeightPacket.build(2, module.state_dict())
    snapshot = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)  # what an optimizer step does to the live weights
    assert all(torch.equal(packet.state[k], snapshot[k]) for k in snapshot)
    verify_loaded(packet, snapshot, 2)  # the checksum still describes the packet's bytes
