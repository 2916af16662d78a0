"""Tensors through pickle protocol 5 as raw bytes (services/wire.py): bit for bit, out of band, owned copies."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from services.broadcast import WeightPacket, verify_loaded
from services.types import RolloutBatch
from services.wire import WireTensor, decode, encode, from_wire, to_wire


def roundtrip(obj, protocol: int = 5):
    """pickle as Ray does (protocol 5, buffers out of band) -> (object back, stream bytes, buffers)."""
    buffers: list = []
    stream = pickle.dumps(obj, protocol=protocol, buffer_callback=buffers.append if protocol >= 5 else None)
    return pickle.loads(stream, buffers=buffers), len(stream), buffers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


CASES = {
    "fp32": torch.randn(3, 4),
    "fp32 with NaN and -0.0": torch.tensor([float("nan"), -0.0, float("inf"), 1e-40]),
    "bf16": torch.randn(5).bfloat16(),
    "fp16": torch.randn(2, 3).half(),
    "int64": torch.arange(7),
    "bool": torch.tensor([True, False, True]),
    "uint8": torch.randint(0, 255, (2, 2, 3), dtype=torch.uint8),
    "0-d": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "transposed": torch.randn(4, 6).t(),
    "needs grad": torch.randn(3, requires_grad=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_dtype_and_layout_comes_back_bit_for_bit(name):
    t = CASES[name]
    for protocol in (5, 4):  # Ray's protocol, and a plain in-band pickle
        back, _, _ = roundtrip(to_wire(t), protocol)
        got = from_wire(back)
        assert same_bits(got, t.detach()) and not got.requires_grad and got.is_contiguous()


def test_the_bytes_travel_out_of_band_and_the_receiver_owns_its_copy():
    t = torch.randn(256, 1024)  # 1 MiB
    before = t.clone()
    back, stream_bytes, buffers = roundtrip(encode({"x": t}))
    assert stream_bytes < 2000 and sum(memoryview(b).nbytes for b in buffers) == t.numel() * 4
    got = decode(back)["x"]
    assert same_bits(got, t)
    got.add_(1.0)  # writable, and not the sender's memory
    assert torch.equal(t, before) and not torch.equal(got, t)
    view = to_wire(t)  # the sending side is a view: no copy until pickled
    assert np.shares_memory(view.data, t.numpy())


def test_encode_walks_containers_and_leaves_other_values_alone():
    value = {"a": [torch.ones(2), 3, "s"], "b": (torch.zeros(1), None), "c": np.arange(3), "d": [1, 2]}
    enc = encode(value)
    assert isinstance(enc["a"][0], WireTensor) and enc["a"][1:] == [3, "s"] and isinstance(enc["b"], tuple)
    assert enc["d"] is value["d"] and enc["c"] is value["c"]
    dec = decode(enc)
    assert torch.equal(dec["a"][0], torch.ones(2)) and dec["b"][1] is None and dec["d"] == [1, 2]


def test_an_unknown_dtype_on_the_wire_is_an_error_naming_it():
    bad = WireTensor("float99", (1,), "cpu", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        from_wire(bad)


def make_batch(final: bool) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    rows, w = 4, 2
    return RolloutBatch(
        prompts=["a red circle", "a blue square"], prompt_ids=[3, 7], group_size=2,
        latents=torch.randn(rows, w, 3, 8, 8, generator=g), next_latents=torch.randn(rows, w, 3, 8, 8, generator=g),
        log_probs=torch.randn(rows, w, generator=g), sigmas=torch.tensor([1.0, 0.9]), sigmas_next=torch.tensor([0.9, 0.8]),
        rewards={"verifier": torch.rand(rows, generator=g), "model": torch.rand(rows, generator=g)},
        cond={"encoder_hidden_states": torch.randn(2, 5, 4, generator=g), "pooled_projections": torch.randn(2, 4)},
        window=(2, 2), iteration=5, weight_version=4, nfe=16, image_evals=64,
        images=np.zeros((1, 8, 8, 3), np.uint8), image_prompts=["a red circle"], image_rows=[1], timings={"sample_s": 1.0},
        final_latents=torch.randn(rows, 3, 8, 8, generator=g) if final else None)


@pytest.mark.parametrize("final", [True, False])
def test_a_rollout_batch_arrives_whole(final):
    batch = make_batch(final)
    back, stream_bytes, buffers = roundtrip(batch)
    assert isinstance(back, RolloutBatch) and buffers and stream_bytes < 4000
    for f in ("prompts", "prompt_ids", "group_size", "window", "iteration", "weight_version", "nfe", "image_evals",
              "image_prompts", "image_rows", "timings", "branches", "steps"):
        assert getattr(back, f) == getattr(batch, f), f
    for f in ("latents", "next_latents", "log_probs", "sigmas", "sigmas_next"):
        assert same_bits(getattr(back, f), getattr(batch, f)), f
    assert back.log_probs.dtype == torch.float32 and back.latents.dtype == torch.float32
    assert all(same_bits(back.rewards[k], batch.rewards[k]) for k in batch.rewards)
    assert all(same_bits(back.cond[k], batch.cond[k]) for k in batch.cond)
    assert (back.final_latents is None) == (not final) and (not final or same_bits(back.final_latents,
                                                                                   batch.final_latents))
    np.testing.assert_array_equal(back.images, batch.images)


def test_a_rollout_batch_is_checked_again_on_arrival():
    """The receiver rebuilds through the constructor, so its checks run there too: bf16 log-probs are refused."""
    batch = make_batch(False)
    _, args = batch.__reduce__()
    args[1]["log_probs"] = to_wire(batch.log_probs.bfloat16())
    stream = pickle.dumps(batch, protocol=5)
    assert isinstance(pickle.loads(stream), RolloutBatch)
    from services.wire import rebuild_dataclass

    with pytest.raises(TypeError, match="log_probs must be fp32"):
        rebuild_dataclass(*args)


def test_a_weight_packet_arrives_with_its_checksum_intact():
    state = {"w": torch.randn(64, 64), "b": torch.randn(64).bfloat16(), "step": torch.tensor(9)}
    packet = WeightPacket.build(12, state)
    back, _, buffers = roundtrip(packet)
    assert len(buffers) == 3 and (back.version, back.checksum, back.num_bytes) == (12, packet.checksum,
                                                                                   packet.num_bytes)
    verify_loaded(packet, back.state, 12)  # the receiver's bytes hash to the sender's checksum
    back.state["w"][0, 0] += 1.0
    with pytest.raises(Exception, match="weight sync failed"):
        verify_loaded(packet, back.state, 12)
