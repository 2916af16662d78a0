"""How tensors cross Ray's object store: as raw bytes, out of band, not through torch's pickler.

Pickling a tensor the default way goes through `torch.save` into a byte string, and unpickling parses it back:
for a rollout shard or a weight packet of a few MB that is tens of milliseconds at each end of every transfer,
on the critical path of every iteration (`benchmarks/wire.py` measures both ways side by side). Here a tensor
becomes (dtype, shape, device, a flat uint8 numpy view of its bytes); pickle protocol 5, which Ray uses, hands
such a view to the object store as an out-of-band buffer without copying it. The receiver copies the bytes
once into a tensor it owns (writable, not tied to the store's memory) of the same dtype, shape and device, so
fp32 log-probs and latents arrive bit for bit.

    class RolloutBatch:
        def __reduce__(self):
            return reduce_dataclass(self)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class WireTensor:
    """A tensor in transit: its bytes as a flat uint8 array (a view of the sender's memory until pickled)."""

    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    device: str
    data: np.ndarray  # (numel · element size,) uint8


def to_wire(t: Tensor) -> WireTensor:
    """A tensor -> its bytes without a copy when it is already a contiguous CPU tensor."""
    t = t.detach()
    device = str(t.device)
    flat = t.to("cpu").contiguous().reshape(-1)  # 0-d tensors included: (1,)
    return WireTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), device, flat.view(torch.uint8).numpy())


def from_wire(w: WireTensor) -> Tensor:
    """The tensor back: its own writable copy of the bytes, with the sent dtype, shape and device."""
    dtype = getattr(torch, w.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor on the wire has an unknown dtype {w.dtype!r}")
    with warnings.catch_warnings():  # the store's buffers are read-only; the tensor is copied out at once
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(w.data)
    t = raw.clone().view(dtype).reshape(w.shape)
    return t if w.device == "cpu" else t.to(w.device)


def _map_leaves(value: Any, leaf: type, fn) -> Any:
    """`fn` applied to every `leaf`, also inside dicts, lists and tuples; containers without one and every other
    value returned as they are."""
    if isinstance(value, leaf):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (leaf, dict, list, tuple)) for v in value):
        return type(value)(_map_leaves(v, leaf, fn) for v in value)
    return value


def encode(value: Any) -> Any:
    """Tensors, also inside dicts, lists and tuples, as `WireTensor`s; everything else unchanged."""
    return _map_leaves(value, Tensor, to_wire)


def decode(value: Any) -> Any:
    """The inverse of `encode`."""
    return _map_leaves(value, WireTensor, from_wire)


def rebuild_dataclass(cls: type, fields: dict[str, Any]) -> Any:
    return cls(**decode(fields))


def reduce_dataclass(obj: Any) -> tuple:
    """`__reduce__` for a dataclass whose fields hold tensors: rebuilt through its constructor (so its checks
    run again on the receiving side) from the encoded fields."""
    fields = {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    return rebuild_dataclass, (type(obj), fields)


__all__ = ["WireTensor", "decode", "encode", "from_wire", "reduce_dataclass", "to_wire"]
