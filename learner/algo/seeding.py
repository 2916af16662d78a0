"""One way to turn integers into a random stream: every seeded draw of a run comes from a key of ints.

    gen = seeded_generator(run_seed, Stream.ROLLOUT_NOISE, iteration, group_id)   # a torch.Generator
    rng = numpy.random.default_rng(mix_seed(run_seed, Stream.PROMPTS, iteration))  # the same key → a numpy one

A key's first two ints are the run seed and the stream (what the randomness is for), so two purposes never
share a stream, and every draw is a pure function of the run seed and where it happens: a worker, a
re-run shard, a restarted actor or a resumed run draws exactly the same numbers without communicating.
The mixing is BLAKE2b over the key's 64-bit two's-complement encodings: distinct keys give independent
63-bit seeds, with none of the collisions of linear recipes such as `seed * C + iteration`.
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum

import torch


class Stream(IntEnum):
    """What a seeded draw is for; the second int of every key."""

    ROLLOUT_NOISE = 1  # (iteration, group id): a group's initial noise and its window's SDE noise
    TRAINED_STEPS = 2  # (iteration,): DanceGRPO's random subset of window steps to train
    WINDOW = 3  # (iteration,): the `random` window strategy's start
    PROMPTS = 4  # (iteration,): the iteration's training prompts
    UPDATE_ORDER = 5  # (iteration, epoch): the learner's shuffle of a batch's rows into micro-batches
    AWM_TIMES = 6  # (iteration, epoch, micro-batch): AWM's stratified training times
    AWM_NOISE = 7  # (iteration, epoch, micro-batch): AWM's fresh ε per (row, time)
    ROW_STEPS = 8  # (iteration, epoch, group id, member): a row's own subset of window steps (DanceGRPO per sample)


def mix_seed(*key: int) -> int:
    """A 63-bit seed (a valid `torch.Generator.manual_seed` and numpy seed) from a key of ints in [−2⁶³, 2⁶⁴)."""
    if not key:
        raise ValueError("mix_seed needs at least one int")
    for k in key:
        if isinstance(k, bool) or not isinstance(k, int) or not -(2**63) <= k < 2**64:
            raise ValueError(f"seed key parts must be ints in [-2**63, 2**64), got {k!r} in {key}")
    packed = struct.pack(f"<{len(key)}Q", *(k % 2**64 for k in key))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def seeded_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `mix_seed(*key)`."""
    return torch.Generator(device=device).manual_seed(mix_seed(*key))
