"""What one iteration's transfers cost to (de)serialize: torch's own pickling against raw bytes out of band.

    python benchmarks/wire.py                 # the default job's shard and weights, and the paper shape's shard
    python benchmarks/wire.py --repeats 50 --ray

Every iteration moves each worker's rollout shard (a RolloutBatch: window latents, log-probs, final latents,
conditioning) to the learner and the learner's weights (a WeightPacket) to every worker, through Ray's object
store, which pickles with protocol 5. A tensor pickled by torch goes through `torch.save` into a byte string;
`services.wire` hands its bytes to the store as an out-of-band buffer instead. Both ways are timed side by side,
in one invocation, on the same objects: pickle.dumps + pickle.loads with a buffer callback, as Ray does (`--ray`
also times ray.put + ray.get through a local object store, one CPU). The objects are built at the real shapes
(the tiny policy's weights, shards of the default job and of `compare_methods.py --paper`), values random.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.broadcast import WeightPacket  # noqa: E402
from services.types import RolloutBatch  # noqa: E402


class TorchPickled:
    """The object's fields pickled by torch's reducers: what crossed the object store before services.wire."""

    def __init__(self, obj) -> None:
        self.fields = dict(vars(obj))


def shard(rows: int, window: int, group_size: int) -> RolloutBatch:
    """A tiny-policy rollout shard: `rows` images, `window` SDE steps, final latents kept (AWM's term)."""
    g = torch.Generator().manual_seed(0)
    groups = rows // group_size
    return RolloutBatch(
        prompts=["a red circle"] * groups, prompt_ids=list(range(groups)), group_size=group_size,
        latents=torch.randn(rows, window, 3, 32, 32, generator=g),
        next_latents=torch.randn(rows, window, 3, 32, 32, generator=g),
        log_probs=torch.randn(rows, window, generator=g), sigmas=torch.rand(window), sigmas_next=torch.rand(window),
        rewards={"shapes_reward": torch.rand(rows), "shapes_verifier": torch.rand(rows)},
        cond={"encoder_hidden_states": torch.randn(groups, 12, 64), "pooled_projections": torch.randn(groups, 64)},
        window=(0, window), iteration=0, weight_version=0, nfe=16, image_evals=rows * 16,
        images=np.zeros((4, 32, 32, 3), np.uint8), image_prompts=["a red circle"] * 4,
        final_latents=torch.randn(rows, 3, 32, 32, generator=g))


def weights() -> WeightPacket:
    from rollout_workers.policies.tiny import TinyConfig, TinyPolicy

    policy = TinyPolicy.from_config(TinyConfig.for_shapes_world(), seed=0)
    return WeightPacket.build(1, policy.trainable_state_dict())


def nbytes(obj) -> int:
    fields = obj.fields if isinstance(obj, TorchPickled) else vars(obj)
    total = 0
    for v in fields.values():
        for t in (v.values() if isinstance(v, dict) else [v]):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def pickle_ms(obj, repeats: int) -> float:
    """Median ms of pickle.dumps + pickle.loads, protocol 5, buffers out of band (as Ray pickles)."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        buffers: list = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        pickle.loads(stream, buffers=buffers)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def ray_ms(obj, repeats: int) -> float:
    import ray

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ray.get(ray.put(obj))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ray", action="store_true", help="also ray.put + ray.get through a local object store")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    objects = {
        "default job shard (32 images, window 4)": shard(32, 4, 8),
        "--paper shard (48 images, window 4)": shard(48, 4, 12),
        "weight packet (tiny policy, fp32)": weights(),
    }
    if args.ray:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores, 1-min load average {load:.1f}; median of {args.repeats}\n")
    cols = ["torch pickling ms", "raw bytes ms", "ratio"] + (["ray torch ms", "ray raw ms", "ratio"] if args.ray else [])
    print("| object | MB | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name, obj in objects.items():
        old = TorchPickled(obj)
        a, b = pickle_ms(old, args.repeats), pickle_ms(obj, args.repeats)
        cells = [f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"]
        if args.ray:
            ra, rb = ray_ms(old, args.repeats), ray_ms(obj, args.repeats)
            cells += [f"{ra:.1f}", f"{rb:.1f}", f"{rb / ra:.2f}"]
        print(f"| {name} | {nbytes(obj) / 1e6:.1f} | " + " | ".join(cells) + " |")
    if args.ray:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
