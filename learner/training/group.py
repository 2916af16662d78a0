"""A learner of K ranks: K processes in one torch.distributed group (NCCL on GPU, gloo on CPU), each holding the
policy, stepping together from the driver.

Data parallel by default (`learner.sharding=none`): the iteration's micro-batches are dealt round-robin, each rank
back-propagates its own, the gradients are summed across ranks (each micro-batch's loss is already divided by the
global number of micro-batches per step), and every rank clips that whole gradient and takes the same optimizer
step, so the replicas stay equal and K ranks compute what one would on the same global batch. With
`learner.sharding=fsdp` the transformer is sharded with FSDP2 (`fully_shard`, each block then the whole), whose
backward reduce-scatters the gradients; weights, optimizer moments and gradients are 1/K per rank.

Statistics are reduced so that every rank returns the global ones. The group is the process's default group;
the weight broadcast to rollout workers has a group of its own (services/broadcast.py `standalone_group`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


class RankGroup:
    def __init__(self, init_method: str, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def owns(self, micro_batch: int) -> bool:
        """Micro-batches are dealt round-robin: rank r computes those with index ≡ r (mod K)."""
        return micro_batch % self.world_size == self.rank

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Data parallel: every rank ends with the sum of all ranks' gradients (one flattened all-reduce)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g.view_as(p)

    def reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        out = values.detach().clone().to(self.device)
        dist.all_reduce(out, op=ops[op])
        return out.cpu()

    def reduce_stats(self, stats: dict, step_loss: torch.Tensor) -> None:
        """Every rank's statistics of its micro-batches (the Learner's update) → the global ones, in place: means
        over all micro-batches, min/max of the ratio, the summed loss per step and forward rows."""
        keys = ("loss", "ratio_mean", "clip_frac", "approx_kl", "kl")
        n = len(stats["loss"])
        sums = self.reduce(torch.tensor([sum(stats[k]) for k in keys] + [n], dtype=torch.float64))
        total = int(sums[-1])
        for i, k in enumerate(keys):
            stats[k] = [float(sums[i]) / total]
        stats["ratio_min"] = [float(self.reduce(torch.tensor(min(stats["ratio_min"], default=1e30)), "min"))]
        stats["ratio_max"] = [float(self.reduce(torch.tensor(max(stats["ratio_max"], default=-1e30)), "max"))]
        first = stats["first_ratio_dev"][0] if stats["first_ratio_dev"] else 0.0  # rank 0 computes micro-batch 0
        stats["first_ratio_dev"] = [float(self.reduce(torch.tensor(first), "max"))]
        step_loss.copy_(self.reduce(step_loss) * 1.0)
        stats["forward_rows"] = [int(self.reduce(torch.tensor(sum(stats["forward_rows"]), dtype=torch.int64)))]
        stats["n_micro"] = [total]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")


def adamw(params: list[torch.nn.Parameter], kwargs: dict) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters: half the step time of the per-tensor loop on the CPU) where
    torch supports it for these parameters' devices and dtypes, else torch's default implementation."""
    try:
        return torch.optim.AdamW(params, **kwargs, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def shard_transformer(transformer: nn.Module) -> None:
    """FSDP2 over the transformer: each block (SD3 `transformer_blocks`; FLUX also `single_transformer_blocks`),
    then the root. FSDP averages the ranks' gradients in its reduce-scatter (gloo has no pre-multiplied sum to
    make it a plain sum), so the learner scales each rank's loss by K: the result is the sum, as in data parallel."""
    from torch.distributed.fsdp import fully_shard

    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, None) or []:
            fully_shard(block)
    fully_shard(transformer)


def full_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded transformer's whole state on the CPU (a collective: every rank calls it; rank 0 receives it, the
    others an empty dict: torch's `cpu_offload` with `full_state_dict`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_fingerprints(transformer: nn.Module, names: Sequence[str], dtype: torch.dtype | None) -> list[int]:
    """Each named parameter's `fp` fingerprint (services/broadcast.py), in `dtype` when given and the parameter is
    floating point, from the shards where they are (a collective: every rank calls; all receive the list): each
    rank adds what its Shard(0) rows contribute at their global offset, so nobody fingerprints the gathered state.
    A parameter that is not sharded is counted by rank 0 alone."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from services.broadcast import P, fingerprint_part, tensor_words

    params = dict(transformer.named_parameters())
    parts = []
    for name in names:
        p = params[name]
        if isinstance(p, DTensor):
            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if tuple(local.shape) != tuple(shape) or any(offset[1:]):
                raise RuntimeError(f"{name}: a shard of shape {tuple(local.shape)} at {offset}, not Shard(0) rows")
            first = offset[0] if local.dim() else 0
        else:
            local, first = p, 0
        t = local.detach()
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        row = math.prod(p.shape[1:])  # elements a row (from the global shape: a rank may hold no rows)
        words_per_element = t.element_size() // 2  # float weights: 2 or 4 bytes an element
        total = -(-p.numel() * t.element_size() // 2)
        if isinstance(p, DTensor) or dist.get_rank() == 0:
            parts.append(fingerprint_part(tensor_words(t), first * row * words_per_element, total))
        else:
            parts.append(torch.zeros((), dtype=torch.int64, device=t.device))
    summed = torch.stack(parts) if parts else torch.zeros(0, dtype=torch.int64)
    dist.all_reduce(summed)  # each part < P: K of them sum far below 2^63
    return torch.remainder(summed, P).tolist()


def sharded_checksum(transformer: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> str | None:
    """The gathered `state`'s `fp` checksum, its fingerprints taken from the shards (`sharded_fingerprints`; every
    rank calls). Rank 0 holds the state (`full_state` leaves the others an empty one), so it alone gets the string."""
    from services.broadcast import checksum_of_prints

    names = sorted(n for n, _ in transformer.named_parameters())
    prints = sharded_fingerprints(transformer, names, dtype)
    if dist.get_rank() != 0:
        return None
    if sorted(state) != names:
        raise RuntimeError(f"the gathered state's names are not the transformer's parameters: {sorted(state)[:3]} …")
    return checksum_of_prints(state, prints)


def load_full_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(transformer, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(transformer: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's state keyed by parameter name, gathered whole (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(transformer, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(transformer: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(transformer, optimizer, state, options=StateDictOptions(full_state_dict=True))
