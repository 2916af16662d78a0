"""`learner.algo.seeding`: one recipe turns (run seed, stream, …) into every seeded draw of a run."""

from __future__ import annotations

import hashlib
import itertools
import struct

import numpy as np
import pytest
import torch

from learner.algo import Stream, Window, mix_seed, seeded_generator, window_at
from learner.training import trained_steps
from services import shapes_world
from services.prompts import PromptSource


def blake2b_seed(*key: int) -> int:
    """Independently: BLAKE2b-64 of the little-endian uint64 encodings, top bit dropped."""
    data = b"".join(struct.pack("<Q", k % 2**64) for k in key)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") // 2


def test_mix_seed_matches_an_independent_computation_and_its_pinned_value():
    for key in [(0,), (0, 1, 0, 0), (7, Stream.PROMPTS, 123), (2**64 - 1, 5), (-1, 2)]:
        assert mix_seed(*key) == blake2b_seed(*key)
    # pinned: changing the recipe silently changes every run's noise, prompts and windows
    assert mix_seed(0, Stream.ROLLOUT_NOISE, 0, 0) == blake2b_seed(0, 1, 0, 0) == 5207352734819769472
    assert mix_seed(-1) == mix_seed(2**64 - 1)  # two's complement, as the key is encoded


def test_distinct_keys_give_distinct_in_range_seeds():
    keys = list(itertools.product(range(4), list(Stream), range(50), range(25)))
    seeds = {mix_seed(*k) for k in keys}
    assert len(seeds) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2, 3) != mix_seed(3, 2, 1) and mix_seed(1, 2) != mix_seed(1, 2, 0)  # order and length count


@pytest.mark.parametrize("bad", [(), (1.0,), (True,), (2**64,), (-(2**63) - 1,), ("1",)])
def test_bad_keys_are_refused(bad):
    with pytest.raises(ValueError):
        mix_seed(*bad)


def test_seeded_generator_is_a_generator_seeded_with_mix_seed():
    a = torch.randn(5, generator=seeded_generator(3, Stream.WINDOW, 9))
    b = torch.randn(5, generator=torch.Generator().manual_seed(mix_seed(3, Stream.WINDOW, 9)))
    assert torch.equal(a, b)


def test_the_run_draws_through_the_helper():
    """Rollout noise, prompts, DanceGRPO's step subset and the random window are the helper's streams (the
    learner's row order: test_seeding_of_the_update_order below)."""
    from tests.unit.test_trainer_inprocess import G, make_worker, small_policy

    worker = make_worker(small_policy())  # run seed 3
    init, sde = worker._noise(7, [4], Window(2, 3))
    gen = seeded_generator(3, Stream.ROLLOUT_NOISE, 7, 4)
    shape = worker.policy.latent_shape
    assert torch.equal(init[0], torch.randn(shape, generator=gen))
    assert torch.equal(sde, torch.randn((G, 3, *shape), generator=gen))

    rng = np.random.default_rng(mix_seed(5, Stream.PROMPTS, 11))
    assert PromptSource("shapes", 5).for_iteration(11, 6) == shapes_world.sample_prompts(6, rng, split="train")
    perm = torch.randperm(10, generator=seeded_generator(5, Stream.TRAINED_STEPS, 11))
    assert trained_steps(10, 0.6, 5, 11) == sorted(perm[:6].tolist())
    start = int(torch.randint(0, 12, (1,), generator=seeded_generator(5, Stream.WINDOW, 11)))
    assert window_at(11, num_steps=16, size=3, shift_interval=1, stride=1, strategy="random", seed=5) == Window(start, 3)


def test_seeding_of_the_update_order(monkeypatch):
    from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

    policy = small_policy()
    learner, worker = make_learner(policy, num_inner_epochs=2), make_worker(small_policy())
    worker.sync_weights(learner.get_weights())
    batch = worker.rollout(4, (1, 2), PROMPTS[:2], [0, 1])
    seen = []
    original = torch.randperm

    def spy(n, *, generator):
        seen.append(generator.initial_seed())
        return original(n, generator=generator)

    monkeypatch.setattr(torch, "randperm", spy)
    learner.update(batch)
    assert seen == [mix_seed(3, Stream.UPDATE_ORDER, 4, epoch) for epoch in (0, 1)]
