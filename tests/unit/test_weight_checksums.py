"""The two weight-sync checksums (services/broadcast.py): the device fingerprint against an independent pure-Python
formulation, what each scheme notices, and the receiver verifying with the sender's scheme."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch

from services.broadcast import (
    DIGEST_CHARS,
    K1,
    K2,
    R1_VALUES,
    R2_VALUES,
    P,
    WeightPacket,
    WeightSyncError,
    checksum_of_prints,
    fingerprint_part,
    tensor_fingerprint,
    verify_loaded,
    weights_checksum,
)


def python_fingerprint(t: torch.Tensor) -> int:
    """The fingerprint written out with Python integers: bytes → little-endian int16 words → folded mod P."""
    raw = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())
    raw += b"\0" * (len(raw) % 2)
    words = [struct.unpack_from("<h", raw, i)[0] for i in range(0, len(raw), 2)] or [0]
    level = [sum(w * R1_VALUES[j] for j, w in enumerate(words[i:i + K1])) % P for i in range(0, len(words), K1)]
    while len(level) > 1:
        level = [sum(v * R2_VALUES[j] for j, v in enumerate(level[i:i + K2])) % P for i in range(0, len(level), K2)]
    return level[0]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3 * K1 + 5),                                        # fp32, three level-1 blocks and a tail
    lambda: torch.randn(17, 9, dtype=torch.bfloat16),                       # bf16
    lambda: torch.arange(7, dtype=torch.uint8),                             # an odd byte count: one zero byte pads
    lambda: torch.tensor(-2.5),                                             # 0-d
    lambda: torch.randint(-2**31, 2**31 - 1, (2 * K1 * K2 + 3,), dtype=torch.int32),  # three levels of folding
    lambda: torch.zeros(0),                                                 # empty
    lambda: torch.arange(9, dtype=torch.uint8)[1:],                         # a view that starts mid-word
])
def test_the_fingerprint_is_the_independent_formulas_number(make):
    torch.manual_seed(0)
    t = make()
    assert int(tensor_fingerprint(t)) == python_fingerprint(t)


def test_the_fingerprint_of_a_tiny_tensor_by_hand():
    # int16 words 1 and -2: 1·R1[0] + (−2)·R1[1] mod P, one level-1 block, so no further level
    t = torch.tensor([1, -2], dtype=torch.int16)
    assert int(tensor_fingerprint(t)) == (R1_VALUES[0] - 2 * R1_VALUES[1]) % P


@pytest.mark.parametrize("scheme", ["b2", "fp"])
def test_each_scheme_notices_a_flipped_bit_a_swap_a_rename_a_dtype_and_a_shape(scheme):
    torch.manual_seed(1)
    state = {"a.weight": torch.randn(3 * K1), "b.bias": torch.randn(64, dtype=torch.bfloat16)}
    base = weights_checksum(state, scheme)
    assert base.startswith(scheme + ":") and len(base) == DIGEST_CHARS
    flipped = state["a.weight"].clone()
    flipped.view(torch.int32)[K1 + 7] ^= 1  # the lowest bit of one float (in level-1 block 2: a float is 2 words)
    swapped = state["a.weight"].clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    # the first two runs of K1 floats trade places: level-1 blocks 0-1 with 2-3 (K1 floats are 2·K1 words)
    blocks = state["a.weight"].clone().view(3, K1)[[1, 0, 2]].reshape(-1)
    variants = [
        {**state, "a.weight": flipped}, {**state, "a.weight": swapped}, {**state, "a.weight": blocks},
        {"a.weight": state["a.weight"], "b.bias2": state["b.bias"]},
        {**state, "b.bias": state["b.bias"].view(torch.int16)},     # the same bytes as another dtype
        {**state, "a.weight": state["a.weight"].view(3, K1)},       # the same bytes in another shape
    ]
    sums = [weights_checksum(v, scheme) for v in variants]
    assert base not in sums and len(set(sums)) == len(sums)
    assert weights_checksum(dict(reversed(list(state.items()))), scheme) == base  # name order, not insertion order


def test_the_multipliers_are_distinct_so_no_two_positions_can_trade_contents_unnoticed():
    assert len(set(R1_VALUES)) == K1 and len(set(R2_VALUES)) == K2
    assert 0 < min(R1_VALUES) and max(R1_VALUES) < P and 0 < min(R2_VALUES) and max(R2_VALUES) < 2**20
    # a swap of two level-1 blocks far apart, and a +1 / -1 pair at the same offset in them: the cases a repeated
    # level-2 multiplier (positions 188 and 434 of an earlier draw) let through
    words = torch.randint(-2**15, 2**15, (435 * K1,), generator=torch.Generator().manual_seed(3), dtype=torch.int16)
    base = int(tensor_fingerprint(words))
    swapped = words.clone().view(435, K1)
    swapped[[188, 434]] = swapped[[434, 188]]
    paired = words.clone().view(435, K1)
    paired[188, 5] += 1
    paired[434, 5] -= 1
    assert base != int(tensor_fingerprint(swapped)) and base != int(tensor_fingerprint(paired))


@pytest.mark.parametrize("total,cuts", [
    (5, [2]),                                   # one level-1 block
    (3 * K1 + 7, [1, K1, K1 + 1, 2 * K1 + 3]),  # cuts on and off the blocks' edges
    (K1 * K2 + 5, [K1 * K2 // 3, K1 * K2]),     # a second level, a part of one word at its end
    (2 * K1 * K2 + 3, [K1 * K2 + 11]),          # K2 + 1 … blocks: three levels
    (100, [0, 0, 50]),                          # empty parts
])
def test_parts_of_a_tensor_add_up_to_its_fingerprint(total, cuts):
    """What a rank of a sharded tensor computes from its rows alone (learner/training/group.py)."""
    words = torch.randint(-2**15, 2**15, (total,), generator=torch.Generator().manual_seed(total), dtype=torch.int16)
    bounds = [0, *cuts, total]
    parts = [int(fingerprint_part(words[a:b], a, total)) for a, b in zip(bounds, bounds[1:])]
    assert sum(parts) % P == int(tensor_fingerprint(words))
    state = {"w": words, "b": words[:5].clone()}
    prints = [int(tensor_fingerprint(state[n])) for n in sorted(state)]
    assert checksum_of_prints(state, prints) == weights_checksum(state, "fp")


def test_the_scheme_follows_the_weights_device_and_the_receiver_uses_the_senders():
    torch.manual_seed(2)
    state = {"w": torch.randn(1000)}
    packet = WeightPacket.build(4, state)
    assert packet.checksum.startswith("b2:")  # CPU weights: blake2b
    # a GPU sender's packet names `fp`: a receiver holding its weights on the CPU verifies with `fp` too
    gpu_like = WeightPacket(4, weights_checksum(state, "fp"), packet.state)
    verify_loaded(gpu_like, {"w": state["w"].clone()}, 4)
    with pytest.raises(WeightSyncError, match="expected version 4 checksum fp:"):
        verify_loaded(gpu_like, {"w": state["w"] + 1e-3}, 4)
    with pytest.raises(WeightSyncError, match="names no known scheme"):
        verify_loaded((4, "md5:" + "0" * 32), state, 4)
    with pytest.raises(ValueError, match="unknown checksum scheme 'md5'"):
        weights_checksum(state, "md5")


def _sharded_ranks(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from learner.training.group import full_state, sharded_checksum, sharded_fingerprints

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    # rows 5, 3 and 1 over two ranks: uneven shards, and rank 1 holds no row of the last layer's weight or bias
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
    fully_shard(model)
    names = sorted(n for n, _ in model.named_parameters())
    prints = sharded_fingerprints(model, names, torch.bfloat16)
    state = full_state(model)  # rank 0's; the other rank gets an empty dict
    checksum = sharded_checksum(model, {k: v.to(torch.bfloat16) for k, v in state.items()}, torch.bfloat16)
    if rank == 0:
        torch.save({"prints": prints, "state": state, "checksum": checksum}, out)
    else:
        assert state == {} and checksum is None
    # both ranks past their last collective before either tears the group down: one rank destroying it while the
    # other still talks aborted a rank once ("terminate called without an active exception", fresh-clone CI)
    dist.barrier()
    dist.destroy_process_group()
    # rank 0 hosts the group's TCP store: it stays until rank 1 has torn its side down too (rank 1 aborted again,
    # once, with the barrier in place: fresh-clone CI, 5 December)
    done = Path(out + ".rank1_done")
    if rank == 1:
        done.touch()
    else:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def test_fsdp_ranks_fingerprint_their_shards_into_the_gathered_states_numbers(tmp_path):
    import torch.multiprocessing as mp

    from tests.redis_server import free_port

    mp.spawn(_sharded_ranks, args=(free_port(), str(tmp_path / "out.pt")), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    names = sorted(got["state"])
    assert len(names) == 6
    bf16 = {n: got["state"][n].to(torch.bfloat16) for n in names}
    assert got["prints"] == [int(tensor_fingerprint(bf16[n])) for n in names]
    assert got["checksum"] == weights_checksum(bf16, "fp")
