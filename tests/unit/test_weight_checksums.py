"""The two weight-sync checksums (services/broadcast.py): the device fingerprint against an independent pure-Python
formulation, what each scheme notices, and the receiver verifying with the sender's scheme."""

from __future__ import annotations

import struct

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
    flipped.view(torch.int32)[K1 + 7] ^= 1  # the lowest bit of one float in the second block
    swapped = state["a.weight"].clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    blocks = state["a.weight"].clone().view(3, K1)[[1, 0, 2]].reshape(-1)  # two whole level-1 blocks trade places
    variants = [
        {**state, "a.weight": flipped}, {**state, "a.weight": swapped}, {**state, "a.weight": blocks},
        {"a.weight": state["a.weight"], "b.bias2": state["b.bias"]},
        {**state, "b.bias": state["b.bias"].view(torch.int16)},     # the same bytes as another dtype
        {**state, "a.weight": state["a.weight"].view(3, K1)},       # the same bytes in another shape
    ]
    sums = [weights_checksum(v, scheme) for v in variants]
    assert base not in sums and len(set(sums)) == len(sums)
    assert weights_checksum(dict(reversed(list(state.items()))), scheme) == base  # name order, not insertion order


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
