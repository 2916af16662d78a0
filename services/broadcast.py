"""Versioned weight broadcast from the learner to rollout workers.

Object store (default): the learner returns a `WeightPacket` once; the driver hands its ObjectRef to
each worker whose version is older, and Ray moves the bytes once per node. Collective: a
torch.distributed group (gloo on CPU, NCCL on GPU) with the learner as rank 0. Either way the
receiver checks the version and a checksum of what it loaded.

Two checksums, each named in the string it returns ("scheme:32 hex digits"), both over names, dtypes, shapes and
bytes in name order:
- `b2`, for weights on the CPU: blake2b over the bytes;
- `fp`, for weights on a GPU: a fingerprint computed where the tensors are (`tensor_fingerprint`), so that
  checking a sync costs no copy to the host and no CPU-side hashing. On one H200, the sender's pack + blake2b and
  the worker's copy to the host + blake2b took 0.80 of the 0.93 s a 100 M-parameter object-store broadcast took
  (benchmarks/README.md). The fingerprint is linear mod P, so a sharded tensor's ranks can each add their part
  (`fingerprint_part`): an FSDP learner checksums its shards where they are, not the state it gathers to the host.
A receiver verifies with the sender's scheme, whichever device it holds its weights on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import Tensor

from services.wire import reduce_dataclass

SCHEMES = ("b2", "fp")
# The fingerprint: a tensor's bytes as signed 16-bit words (a zero byte pads an odd count), folded by
# multiplier vectors, modulo the prime P. Level 1 takes blocks of K1 words against R1 (|word · r| < 2^46, a block's
# sum < 2^58); each further level takes blocks of K2 residues against R2, until one residue is left: a level-1
# block's residue times the product of its R2 multipliers (`_coefficients`, each product < 2^51 before its mod). Every step is exact int64 arithmetic, so any device gives the same number. A linear hash: not
# for adversaries, but any one changed word changes it, and two that cancel need a coincidence mod P.
P = 2**31 - 1
K1, K2 = 4096, 2048
CHUNK_BLOCKS = 4096  # level-1 blocks per pass: bounds the int64 temporaries at 128 MiB each


def _splitmix64(seed: int, n: int, below: int) -> list[int]:
    """n distinct integers in [1, below) from SplitMix64: pure Python, so every process and device draws the same.
    Distinct: two positions with one multiplier would not tell their contents apart when swapped."""
    out, seen, x, mask = [], set(), seed, (1 << 64) - 1
    while len(out) < n:
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        value = 1 + (z ^ (z >> 31)) % (below - 1)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


R1_VALUES, R2_VALUES = _splitmix64(1, K1, P), _splitmix64(2, K2, 1 << 20)


@functools.cache
def _multipliers(device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(R1_VALUES, dtype=torch.int64, device=device),
            torch.tensor(R2_VALUES, dtype=torch.int64, device=device))


def tensor_words(t: Tensor) -> Tensor:
    """A tensor's bytes as the fingerprint reads them: little-endian int16 words, a zero byte padding an odd count."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 2:
        raw = torch.nn.functional.pad(raw, (0, 1))
    elif raw.storage_offset() % 2:  # a byte view that starts mid-word: int16 needs its own copy
        raw = raw.clone()
    return raw.view(torch.int16)


def tensor_fingerprint(t: Tensor) -> Tensor:
    """The fingerprint of one tensor's bytes (module docstring): a 0-d int64 tensor on `t`'s device, in [0, P)."""
    words = tensor_words(t)
    return fingerprint_part(words, 0, words.numel())


def _coefficients(blocks: Tensor, total_blocks: int, r2: Tensor) -> Tensor:
    """Each level-1 block's multiplier through the further levels (mod P): the product, over the levels that fold
    `total_blocks` residues down to one, of R2 at the block's place within its level's block."""
    coef, index, length = torch.ones_like(blocks), blocks, total_blocks
    while length > 1:
        coef = torch.remainder(coef * r2[index % K2], P)
        index, length = index // K2, -(-length // K2)
    return coef


def fingerprint_part(words: Tensor, start: int, total: int) -> Tensor:
    """What the int16 `words` at positions start … start + len − 1 of a tensor's `total` words add to its
    fingerprint: a 0-d int64 tensor in [0, P) on their device. The fingerprint is linear mod P, so the parts of a
    partition of the words, summed mod P, give the whole's (`tensor_fingerprint` is the one part that is all of
    it; each rank of a sharded tensor adds its own). Level-1 blocks are whole K1 words from position 0: a part that
    starts or ends inside one is padded with zero words there, which add nothing."""
    r1, r2 = _multipliers(words.device)
    total_blocks = max(1, -(-total // K1))
    out = torch.zeros((), dtype=torch.int64, device=words.device)
    step = CHUNK_BLOCKS * K1
    a, end = start, start + words.numel()
    while a < end:  # chunks [a, b) on block edges (but the first's start), bounding the int64 temporaries
        b = min(end, (a // step + 1) * step)
        piece = words[a - start:b - start].to(torch.int64)
        piece = torch.nn.functional.pad(piece, (a % K1, -b % K1)).view(-1, K1)
        sums = torch.remainder((piece * r1).sum(1), P)  # each block: |sum| < 2^58
        blocks = torch.arange(a // K1, a // K1 + sums.numel(), device=words.device)
        out = torch.remainder(out + torch.remainder(sums * _coefficients(blocks, total_blocks, r2), P).sum(), P)
        a = b
    return out


def checksum_of_prints(state: Mapping[str, Tensor], prints: Sequence[int]) -> str:
    """The `fp` checksum of `state` from its tensors' fingerprints, given in name order (from shards, say)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if state:
        h.update(torch.tensor(list(prints), dtype=torch.int64).numpy().tobytes())
    return f"fp:{h.hexdigest()}"


def weights_checksum(state: Mapping[str, Tensor], scheme: str | None = None) -> str:
    """"scheme:digest" over names, dtypes, shapes and bytes, in name order (module docstring). `scheme` None: `fp`
    when a tensor is on a GPU, else `b2`."""
    if scheme is None:
        scheme = "fp" if any(t.device.type != "cpu" for t in state.values()) else "b2"
    if scheme not in SCHEMES:
        raise ValueError(f"unknown checksum scheme {scheme!r}; expected one of {SCHEMES}")
    names = sorted(state)
    if scheme == "fp":
        if not names:
            return checksum_of_prints(state, [])
        # one transfer of every tensor's fingerprint
        return checksum_of_prints(state, torch.stack([tensor_fingerprint(state[n]).to(state[names[0]].device)
                                                      for n in names]).cpu().tolist())
    h = hashlib.blake2b(digest_size=16)
    for name in names:
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # in place, 0-d too
    return f"b2:{h.hexdigest()}"


DIGEST_CHARS = 35  # "b2:" or "fp:" and 32 hex digits


@dataclass
class WeightPacket:
    version: int
    checksum: str
    state: dict[str, Tensor] = field(repr=False)
    num_bytes: int = 0

    def __reduce__(self):  # the weights as raw bytes through the object store (services/wire.py)
        return reduce_dataclass(self)

    @classmethod
    def build(cls, version: int, state: Mapping[str, Tensor], checksum: str | None = None) -> WeightPacket:
        """`checksum`: the state's, when the caller has it (an FSDP learner's, from its shards); else taken here,
        where the weights are (a GPU's: `fp`, with no host-side hashing), before the copy."""
        # a snapshot: policies hand out tensors that share storage with their live weights
        checksum = checksum or weights_checksum(state)
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        return cls(version, checksum, cpu, sum(t.numel() * t.element_size() for t in cpu.values()))


class WeightSyncError(RuntimeError):
    """A worker did not end up with the weights it was sent."""


def verify_loaded(expected: WeightPacket | tuple[int, str], loaded_state: Mapping[str, Tensor], version: int) -> None:
    """Raise unless the receiver now holds exactly the sent version and bytes."""
    exp_version, exp_sum = (expected.version, expected.checksum) if isinstance(expected, WeightPacket) else expected
    scheme = exp_sum.split(":", 1)[0]
    if scheme not in SCHEMES:
        raise WeightSyncError(f"weight sync failed: the sender's checksum {exp_sum!r} names no known scheme {SCHEMES}")
    got = weights_checksum(loaded_state, scheme)
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

    def broadcast(self, state: dict[str, Tensor], version: int, checksum: str | None = None) -> tuple[int, str]:
        """Send (rank 0) or receive (others) `state` in place, in name order; returns (version, checksum).
        `checksum` (rank 0): the state's when the caller has it, else taken here.

        The receivers' tensors must have the sender's shapes and dtypes (the learner sends in the workers' dtype).
        """
        header = torch.tensor([version], dtype=torch.long, device=self.device)
        self._broadcast(header)
        for name in sorted(state):
            buf = state[name].detach().to(self.device).contiguous()
            self._broadcast(buf)
            if self.rank != 0:
                state[name].copy_(buf.to(state[name].device))
        # the sender's checksum ("scheme:" and 32 hex characters) as bytes: what every receiver must end up holding
        digest = torch.zeros(DIGEST_CHARS, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            checksum = checksum or weights_checksum(state)
            assert len(checksum) == DIGEST_CHARS, checksum  # every rank receives exactly DIGEST_CHARS bytes
            digest = torch.tensor(list(checksum.encode()), dtype=torch.uint8, device=self.device)
        self._broadcast(digest)
        return int(header.item()), bytes(digest.cpu().tolist()).decode()

    def close(self) -> None:
        self.group = None
