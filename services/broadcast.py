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


def weights_checksum(state: Mapping[str, Tensor]) -> str:
    """blake2b over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class WeightPacket:
    version: int
    checksum: str
    state: dict[str, Tensor] = field(repr=False)
    num_bytes: int = 0

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


class CollectiveChannel:
    """A torch.distributed group over the learner (rank 0) and the rollout workers (ranks 1…N)."""

    def __init__(self, rank: int, world_size: int, init_method: str, backend: str = "gloo",
                 group_name: str = "mixgrpo-weights") -> None:
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=120))
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")

    def broadcast(self, state: dict[str, Tensor], version: int) -> tuple[int, str]:
        """Send (rank 0) or receive (others) `state` in place, in name order; returns (version, checksum)."""
        import torch.distributed as dist

        header = torch.tensor([version], dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        for name in sorted(state):
            buf = state[name].detach().to(self.device).contiguous()
            dist.broadcast(buf, src=0)
            if self.rank != 0:
                state[name].copy_(buf.to(state[name].device))
        sums = [weights_checksum(state)] if self.rank == 0 else [None]
        dist.broadcast_object_list(sums, src=0)  # checksum string from the sender (in-cluster only)
        return int(header.item()), sums[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
