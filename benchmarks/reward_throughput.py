"""Reward serving throughput: dynamic batching vs none, on the learned shapes reward.

    python benchmarks/reward_throughput.py                       # handles, 1 image/request, 2 client actors
    python benchmarks/reward_throughput.py --transport http --images-per-request 8 --clients 1
    python benchmarks/reward_throughput.py --serve-throughput-optimized   # RAY_SERVE_THROUGHPUT_OPTIMIZED=1

Deploys two Serve apps side by side on one local 2-CPU Ray: `batched` (max_batch_size=64, 10 ms wait)
and `unbatched` (max_batch_size=1), one replica each with the same CPU share. For each concurrency level
C, `--clients` Ray actors (like rollout workers) together keep C requests in flight for `--seconds`
(closed loop: each of the C loops sends a request, waits for the answer, sends the next). Prints a
Markdown table (images/s, p50/p99 request latency, mean observed batch size) and the batched/unbatched
throughput ratio at the highest concurrency. Load comes from actors rather than the driver because one
Python process tops out at a few hundred handle calls/s on a small machine, which would cap both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import numpy as np
import ray

from services import shapes_world as sw
from services.config import RewardServerConfig, RewardSpec


def deploy(port: int, num_cpus: float) -> None:
    """Start Ray + Serve and deploy the `batched` and `unbatched` apps (shapes_reward, 1 replica each)."""
    from ray import serve

    from reward_servers.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, namespace="reward-bench", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, batch in (("batched", 64), ("unbatched", 1)):
        spec = RewardSpec(name="shapes_reward", num_cpus=num_cpus, max_batch_size=batch, batch_wait_timeout_s=0.01,
                          max_ongoing_requests=128, max_queued_requests=-1)
        server = RewardServerConfig(port=port, app_name=name, auth_token_env="MIXGRPO_BENCH_NO_TOKEN")
        serve.run(build_app([spec], server), name=name, route_prefix=f"/{name}")


@ray.remote(num_cpus=0)
class LoadClient:
    """Keeps `concurrency` requests in flight against one app, over a handle or HTTP."""

    def __init__(self, transport: str, port: int, images_per_request: int, seed: int) -> None:
        import httpx

        from reward_servers.payload import encode_array

        rng = np.random.default_rng(seed)
        self.prompts = sw.sample_prompts(images_per_request, rng)
        self.images = np.stack([sw.render(p, rng) for p in self.prompts])  # (B, 32, 32, 3) uint8
        self.transport, self.port = transport, port
        self.body = {"prompts": self.prompts, "array": encode_array(self.images)}
        self.http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=256))

    async def _call(self, app: str) -> dict:
        if self.transport == "handle":
            from ray import serve

            handle = serve.get_deployment_handle("reward_shapes_reward", app_name=app)
            result = await handle.score.remote(self.images, self.prompts)
            assert result["error"] is None, result["error"]
            return result
        r = await self.http.post(f"http://127.0.0.1:{self.port}/{app}/v1/rewards/shapes_reward/score", json=self.body)
        r.raise_for_status()
        return r.json()

    async def run(self, app: str, concurrency: int, seconds: float) -> dict:
        """-> {"latencies": [s], "batches": [requests per model call], "images": n, "wall": s}."""
        latencies: list[float] = []
        batches: list[int] = []
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                result = await self._call(app)
                latencies.append(time.perf_counter() - t)
                batches.append(int(result["batch_size"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return {"latencies": latencies, "batches": batches, "images": len(latencies) * len(self.prompts),
                "wall": time.perf_counter() - t0}


def measure(clients: list, app: str, concurrency: int, seconds: float) -> dict:
    """Split `concurrency` loops over the client actors, run them together, aggregate."""
    shares = [concurrency // len(clients) + (i < concurrency % len(clients)) for i in range(len(clients))]
    parts = ray.get([c.run.remote(app, s, seconds) for c, s in zip(clients, shares) if s > 0])
    ms = np.concatenate([p["latencies"] for p in parts]) * 1e3
    wall = max(p["wall"] for p in parts)
    return {"mode": app, "concurrency": concurrency, "images_per_s": sum(p["images"] for p in parts) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": float(np.mean(np.concatenate([p["batches"] for p in parts]))), "requests": len(ms)}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"transport={args.transport}, {args.images_per_request} image(s)/request, {args.clients} client "
             f"actor(s), {args.seconds:.0f} s per level, replica num_cpus={args.num_cpus}, RAY_SERVE_THROUGHPUT_OPTIMIZED="
             f"{os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}", "",
             "| mode | concurrency | images/s | p50 ms | p99 ms | mean batch (requests) | requests |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['requests']} |")
    top = max(args.concurrency)
    tput = {r["mode"]: r["images_per_s"] for r in rows if r["concurrency"] == top}
    lines += ["", f"batched / unbatched throughput at {top} concurrent requests: "
                  f"{tput['batched'] / tput['unbatched']:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=("handle", "http"), default="handle")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--clients", type=int, default=2, help="load-generating actors (like rollout workers)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per reward replica (torch threads = floor, min 1)")
    p.add_argument("--serve-throughput-optimized", action="store_true",
                   help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC data plane, lighter request path) before Ray starts")
    args = p.parse_args()
    if args.serve_throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by Serve at import, in every process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deploy(port, args.num_cpus)
    try:
        clients = [LoadClient.remote(args.transport, port, args.images_per_request, seed=0)
                   for _ in range(args.clients)]
        rows = []
        for app in ("batched", "unbatched"):
            measure(clients, app, 8, 1.0)  # warm-up: handles, connections, first model calls
            for c in args.concurrency:
                rows.append(measure(clients, app, c, args.seconds))
                print(f"  {app:9s} c={c:3d}: {rows[-1]['images_per_s']:8.1f} images/s", flush=True)
    finally:
        from ray import serve

        serve.shutdown()
    print(table(rows, args))
    ray.shutdown()


if __name__ == "__main__":
    main()
