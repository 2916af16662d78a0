"""Weight broadcast time by model size and number of workers: object store against the collective path.

    python benchmarks/weight_sync.py                                 # 1M, 10M, 100M params; 1 and 2 workers
    python benchmarks/weight_sync.py --max-params 1e9 --repeats 2    # also 1B where memory allows (4 GB fp32)
    python benchmarks/weight_sync.py --sizes 1e6 1e7 --workers 1 2 4
    python benchmarks/weight_sync.py --device cuda --dtype bf16 --sizes 1e8 1e9 2.5e9 --max-params 1.2e10

`--device cuda` keeps the weights on the GPUs in the workers' dtype, as a real run does: the object-store path
stages them on the CPU (the learner's `WeightPacket`) and each worker copies them back to its GPU; the collective
path is an NCCL broadcast from the sender's GPU straight into each worker's GPU tensors. NCCL refuses two ranks
on one device, so the collective path needs workers + 1 GPUs and is skipped, said so, with fewer; the object-store
path shares the GPUs fractionally.

Both paths do what a training run does each iteration (`learner/driver/rollouts.py` `broadcast`, `services/broadcast.py`),
on plain fp32 tensors in Ray actors instead of a model:

- object store: the sender builds one `WeightPacket` (CPU tensors + the checksum: blake2b of CPU weights, the
  device fingerprint of GPU ones, taken before the copy) and returns it; the
  driver hands its ObjectRef to every worker, which pulls it, copies it into its own tensors and verifies
  version and checksum (`verify_loaded`).
- collective: a torch.distributed gloo group (sender rank 0, workers 1…N, formed once, not timed);
  `CollectiveChannel.broadcast` sends each tensor, then the sender's checksum; every worker loads and verifies.

Times are wall-clock seconds on the driver from the first call to every worker holding the verified version
(median of `--repeats`), plus the parts the actors time themselves: the sender's packing + checksum and the
slowest worker's load and checksum verification. Actors take fractional CPUs (a two-core machine waits forever
on whole ones). A configuration is skipped, and said so, when its estimated peak memory (sender weights, the
object-store copy, each worker's weights and its deserialised copy) does not fit in the available RAM or the
object store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish, synchronize  # noqa: E402 (needs the path above)
from services.broadcast import CollectiveChannel, WeightPacket, verify_loaded  # noqa: E402

GiB = 2**30


# ---------------------------------------------------------------------------------- pure helpers
def tensor_sizes(num_params: int, num_tensors: int) -> list[int]:
    """`num_params` split into `num_tensors` nearly equal tensors (the first ones one larger)."""
    k, r = divmod(num_params, num_tensors)
    return [k + (i < r) for i in range(num_tensors) if k + (i < r) > 0]


def peak_bytes(num_params: int, workers: int, path: str) -> int:
    """Estimated peak memory of one configuration in fp32 bytes.

    Object store: sender weights + the packet in the object store + per worker 3× (its weights, the
    deserialised packet, and the pickled bytes it is rebuilt from: a 1B-parameter worker was measured at
    10.5 GB). Collective: sender + per worker its weights (the broadcast writes into them in place).
    """
    size = 4 * num_params
    return size * (2 + 3 * workers) if path == "object_store" else size * (1 + workers)


def markdown(rows: list[dict]) -> str:
    lines = ["| parameters | size | path | workers | broadcast s (median) | sender pack + checksum s | "
             "worker load s | worker verify s | effective GB/s |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {_count(r['params'])} | {_size(r.get('bytes', 4 * r['params']))} | {r['path']} | "
                         f"{r['workers']} | skipped: {r['skipped']} | | | | |")
            continue
        rate = r["bytes"] / r["seconds"] / 1e9
        lines.append(f"| {_count(r['params'])} | {_size(r['bytes'])} | {r['path']} | {r['workers']} | "
                     f"{r['seconds']:.3f} | {r['send_s']:.3f} | {r['load_s']:.3f} | {r['verify_s']:.3f} | {rate:.2f} |")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def _size(b: int) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------- actors
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _weights(sizes: list[int], fill: bool, device: str, dtype: str) -> dict[str, torch.Tensor]:
    # names sort in creation order, like a model's parameters; values are irrelevant to the timing
    dev, dt = torch.device(device), DTYPES[dtype]
    return {f"layer{i:03d}.weight": (torch.rand(n, device=dev) if fill else torch.zeros(n, device=dev)).to(dt)
            for i, n in enumerate(sizes)}


@ray.remote(num_cpus=0.25)
class Sender:
    """The learner's side: owns the weights; a new version before each sync."""

    def __init__(self, sizes: list[int], device: str = "cpu", dtype: str = "fp32") -> None:
        self.state, self.version, self.send_s = _weights(sizes, True, device, dtype), 0, 0.0
        self.device = device

    def step(self) -> int:
        first = next(iter(self.state.values()))
        first[0] += 1.0  # an optimizer step, as far as the checksum can tell
        self.version += 1
        return self.version

    def get_weights(self) -> WeightPacket:
        t = time.perf_counter()
        packet = WeightPacket.build(self.version, self.state)
        self.send_s = time.perf_counter() - t  # pack + checksum; serialisation happens after return
        return packet

    def last_send_s(self) -> float:
        return self.send_s

    def address(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    def open_channel(self, init: str, world: int) -> None:
        self.channel = CollectiveChannel(0, world, init, "nccl" if self.device == "cuda" else "gloo")

    def send_weights(self) -> float:
        t = time.perf_counter()
        self.channel.broadcast(self.state, self.version)
        synchronize(self.device)
        return time.perf_counter() - t


@ray.remote(num_cpus=0.25)
class Receiver:
    """A rollout worker's side: its own weights, loaded from each sync and verified."""

    def __init__(self, sizes: list[int], device: str = "cpu", dtype: str = "fp32") -> None:
        self.state, self.version, self.device = _weights(sizes, False, device, dtype), 0, device

    def sync(self, packet: WeightPacket) -> dict:  # the ObjectRef is resolved (pulled) before this runs
        t0 = time.perf_counter()
        for name, tensor in self.state.items():
            tensor.copy_(packet.state[name])
        synchronize(self.device)
        t1 = time.perf_counter()
        verify_loaded(packet, self.state, packet.version)
        self.version = packet.version
        return {"load_s": t1 - t0, "verify_s": time.perf_counter() - t1}

    def open_channel(self, rank: int, init: str, world: int) -> None:
        self.channel = CollectiveChannel(rank, world, init, "nccl" if self.device == "cuda" else "gloo")

    def receive(self) -> dict:
        t0 = time.perf_counter()
        version, checksum = self.channel.broadcast(self.state, -1)  # in place, like the worker's state dict
        synchronize(self.device)
        t1 = time.perf_counter()
        verify_loaded((version, checksum), self.state, version)
        self.version = version
        return {"load_s": t1 - t0, "verify_s": time.perf_counter() - t1}


# ---------------------------------------------------------------------------------- measuring
def gpus_per_actor(path: str, workers: int, device: str, gpus: int) -> float:
    """One GPU each for NCCL ranks; the object-store path shares what there is."""
    if device != "cuda":
        return 0.0
    return 1.0 if path == "collective" else min(1.0, gpus / (workers + 1))


def measure(path: str, num_params: int, workers: int, num_tensors: int, repeats: int, device: str = "cpu",
            dtype: str = "fp32", gpus: int = 0) -> dict:
    sizes = tensor_sizes(num_params, num_tensors)
    opts = {"num_gpus": gpus_per_actor(path, workers, device, gpus)}
    sender = Sender.options(**opts).remote(sizes, device, dtype)
    receivers = [Receiver.options(**opts).remote(sizes, device, dtype) for _ in range(workers)]
    try:
        if path == "collective":
            init = ray.get(sender.address.remote())
            ray.get([sender.open_channel.remote(init, workers + 1),
                     *[r.open_channel.remote(i + 1, init, workers + 1) for i, r in enumerate(receivers)]])
        walls, sends, loads, verifies = [], [], [], []
        for _ in range(repeats + 1):  # the first sync warms up (allocation, connections) and is dropped
            ray.get(sender.step.remote())
            t0 = time.perf_counter()
            if path == "object_store":
                packet = sender.get_weights.remote()
                parts = ray.get([r.sync.remote(packet) for r in receivers])
                del packet
                send = ray.get(sender.last_send_s.remote())
            else:
                sent = sender.send_weights.remote()
                parts = ray.get([r.receive.remote() for r in receivers])
                send = ray.get(sent)
            walls.append(time.perf_counter() - t0)
            sends.append(send)
            loads.append(max(p["load_s"] for p in parts))
            verifies.append(max(p["verify_s"] for p in parts))
        med = statistics.median
        return {"params": num_params, "bytes": num_params * DTYPES[dtype].itemsize, "path": path,
                "workers": workers, "seconds": med(walls[1:]),
                "send_s": med(sends[1:]), "load_s": med(loads[1:]), "verify_s": med(verifies[1:]),
                "all_s": walls[1:]}
    finally:
        for actor in (sender, *receivers):
            ray.kill(actor)
        time.sleep(1.0)  # let the processes exit and their memory return before the next configuration


def fits(num_params: int, workers: int, path: str, margin_gib: float, device: str = "cpu", dtype: str = "fp32",
         gpus: int = 0) -> str | None:
    """None when the configuration fits; else why not (host memory is estimated as if on the CPU: an upper bound)."""
    import psutil

    if device == "cuda" and path == "collective" and gpus < workers + 1:
        return f"NCCL needs one GPU per rank: {workers + 1}, {gpus} here"
    need = peak_bytes(num_params, workers, path) * DTYPES[dtype].itemsize // 4
    avail = psutil.virtual_memory().available
    if need + margin_gib * GiB > avail:
        return f"needs ~{need / GiB:.0f} GiB + {margin_gib:g} GiB margin, {avail / GiB:.0f} GiB free"
    store = ray.cluster_resources().get("object_store_memory", 0)
    packet = DTYPES[dtype].itemsize * num_params
    if path == "object_store" and packet > 0.8 * store:
        return f"packet {packet / GiB:.1f} GiB > 80% of the {store / GiB:.1f} GiB object store"
    return None


def gpus_line(device: str, gpus: int) -> str:
    if device != "cuda":
        return "weights on the CPU; "
    return f"weights on {gpus} × {torch.cuda.get_device_name()}; "


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9], help="parameter counts")
    p.add_argument("--max-params", type=float, default=1e8, help="skip sizes above this (1B fp32 is 4 GB)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--paths", nargs="+", default=["object_store", "collective"], choices=["object_store", "collective"])
    p.add_argument("--tensors", type=int, default=32, help="tensors the parameters are split into")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per configuration (after one warm-up)")
    p.add_argument("--margin-gib", type=float, default=3.0, help="RAM left free for other jobs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides hold the weights")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the weights' dtype (a GPU run's: bf16)")
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and not gpus:
        p.error("--device cuda: no CUDA device here")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False, namespace="weight-sync-bench")
    rows = []
    try:
        for n in sorted(int(s) for s in args.sizes):
            for workers in args.workers:
                for path in args.paths:
                    why = "above --max-params" if n > args.max_params else fits(
                        n, workers, path, args.margin_gib, args.device, args.dtype, gpus)
                    if not why:
                        try:
                            rows.append(measure(path, n, workers, args.tensors, args.repeats, args.device,
                                                args.dtype, gpus))
                        except ray.exceptions.RayError as e:  # e.g. Ray's OOM killer took an actor
                            why = f"failed: {type(e).__name__}"
                    if why:
                        rows.append({"params": n, "path": path, "workers": workers, "skipped": why})
                    print("  " + markdown(rows[-1:]).splitlines()[-1], flush=True)
                    if args.out:  # kept row by row: a run cut short by a time bound still leaves its rows
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        partial = args.out.with_name(args.out.name + ".part")
                        partial.write_text(f"(in progress: {len(rows)} configurations so far)\n\n{markdown(rows)}\n")
                        os.replace(partial, args.out)  # whole or not at all, also under a kill
    finally:
        store = ray.cluster_resources().get("object_store_memory", 0)
        ray.shutdown()
    import psutil

    text = (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / GiB:.0f} GiB RAM, object store "
            f"{store / GiB:.1f} GiB; {gpus_line(args.device, gpus)}{args.dtype} weights in {args.tensors} tensors; median of {args.repeats} syncs after "
            f"one warm-up; 1-min load average at the end {os.getloadavg()[0]:.1f}\n\n{markdown(rows)}\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
