"""Versioned weight broadcast from the learner to rollout workers.

Object store (default): the learner returns a `WeightPacket` once; the driver hands its ObjectRef to
each worker whose version is older, and Ray moves the bytes once per node. Collective: a
torch.distributed group (gloo on CPU, NCCL on GPU) with the learner as rank 0. Either way the
receiver checks the version and a checksum of what it loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import Tensor

from services.wire import reduce_dataclass


def weights_checksum(state: Mapping[str, Tensor]) -> str:
    """blake2b over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, hashed in place (0-d included)
    return h.hexdigest()


@dataclass
class WeightPacket:
    version: int
    checksum: str
    state: dict[str, Tensor] = field(repr=False)
    num_bytes: int = 0

    def __reduce__(self):  # the weights as raw bytes through the object store (services/wire.py)
        return reduce_dataclass(self)

    @classmethod
    def build(cls, version: int, state: Mapping[str, Tensor]) -> WeightPacket:
        # a snapshot: policies hand out tensors that share storage with their live weights
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        return cls(version, weights_checksum(cpu), cpu, sum(t.numel() * t.element_size() for t in cpu.values()))


class WeightSyncError(RuntimeError):
    """A worker did not end up with the weights it was sent."""


def verify_loaded(expected: WeightPacket | tuple[int, str], loaded_state: Mapping[str, Tensor], version: int) -> None:
    """Raise unless the receiver now holds exactly the sent version and bytes."""
    exp_version, exp_sum = (expected.version, expected.checksum) if isinstance(expected, WeightPacket) else expected
    got = weights_checksum(loaded_state)
    if version != exp_version or got != exp_sum:
        raise WeightSyncError(
            f"weight sync failed: expected version {exp_version} checksum {exp_sum}, "
            f"have version {version} checksum {got}"
        )


# ------------------------------------------------------------------ collective (torch.distributed)


def standalone_group(init_method: str, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 120.0):
    """A torch.distributed process group of its own (own TCPStore, not the process's default group), so a learner
    rank can be in its learner group (the default group: gradients, FSDP) and in the weight-broadcast group.

    `init_method` is tcp://host:port; rank 0 hosts the store. -> a c10d ProcessGroup (broadcast, allreduce).
    """
    import torch.distributed as dist

    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"unknown collective backend {backend!r}; expected gloo or nccl")


class CollectiveChannel:
    """The weight-broadcast group: learner rank 0 and the rollout workers (ranks 1…N), on a standalone process
    group (`standalone_group`). NCCL sends GPU tensors straight into the workers' GPU weights; gloo CPU tensors."""

    def __init__(self, rank: int, world_size: int, init_method: str, backend: str = "gloo") -> None:
        self.rank, self.world_size = rank, world_size
        self.group = standalone_group(init_method, rank, world_size, backend)
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")

    def _broadcast(self, tensor: Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def broadcast(self, state: dict[str, Tensor], version: int) -> tuple[int, str]:
        """Send (rank 0) or receive (others) `state` in place, in name order; returns (version, checksum).

        The receivers' tensors must have the sender's shapes and dtypes (the learner sends in the workers' dtype).
        """
        header = torch.tensor([version], dtype=torch.long, device=self.device)
        self._broadcast(header)
        for name in sorted(state):
            buf = state[name].detach().to(self.device).contiguous()
            self._broadcast(buf)
            if self.rank != 0:
                state[name].copy_(buf.to(state[name].device))
        # the sender's checksum (32 hex characters) as bytes: what every receiver must end up holding
        digest = torch.zeros(32, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            digest = torch.tensor(list(weights_checksum(state).encode()), dtype=torch.uint8, device=self.device)
        self._broadcast(digest)
        return int(header.item()), bytes(digest.cpu().tolist()).decode()

    def close(self) -> None:
        self.group = None
