"""The reward REST API past its capacity: every accepted request answered right, the excess refused with 429.

    python benchmarks/reward_load.py                          # 1×, 2×, 4× capacity, 6 s each (about a minute)
    python benchmarks/reward_load.py --levels 1 4 --seconds 3

On a local Ray (loopback only) the script deploys the rule verifier with a small queue (`max_ongoing_requests` 4,
`max_queued_requests` 8), so the reward, not the HTTP proxy, is what saturates. It measures the capacity first: the
throughput of as many closed-loop clients as the replica takes at once. Then, for each level L, it offers L × that
rate open-loop (requests sent on a fixed clock, whether or not earlier ones came back) for `--seconds`, without
retries, and records every response: status, latency, Retry-After, and whether the scores equal the verifier's
own scores of those images computed here (each request is different: the renders of its own prompts, some of them
corrupted). A 5xx, a response without its scores, a 429 without Retry-After or a wrong score is a failure. The
table: offered and accepted rate, p50 / p99 latency of the accepted, the share refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGES_PER_REQUEST = 32


@dataclass
class Level:
    """What one load level saw."""

    factor: float
    offered_per_s: float
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # of the accepted (200) requests
    wrong_scores: int = 0
    refusals_without_retry_after: int = 0
    lost: int = 0  # requests with no response at all (connection errors, timeouts)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + self.lost

    @property
    def accepted(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def refused(self) -> int:
        return self.statuses.get(429, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def row(self) -> dict:
        lat = sorted(self.latencies_ms)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))  # noqa: E731
        return {"level": f"{self.factor:g}×", "offered_per_s": self.offered_per_s, "sent": self.sent,
                "accepted_per_s": self.accepted / self.seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "refused_pct": 100 * self.refused / max(self.sent, 1), "server_errors": self.server_errors,
                "other": self.sent - self.accepted - self.refused - self.server_errors,
                "wrong_scores": self.wrong_scores, "no_retry_after": self.refusals_without_retry_after}


def requests_pool(n: int, seed: int = 0) -> list[tuple[bytes, np.ndarray]]:
    """n distinct request bodies (raw-array JSON, serialised once: the client's CPU goes to sending) and the
    verifier's expected scores of each."""
    import json

    from reward_servers.payload import encode_array
    from services import shapes_world as sw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompts = sw.sample_prompts(IMAGES_PER_REQUEST, rng, split="train")
        images = np.stack([sw.render(p, rng) if rng.random() < 0.5 else sw.corrupt(p, sw.render(p, rng), rng, "recolor")
                           for p in prompts])
        expected = np.array([sw.verify(p, im).score for p, im in zip(prompts, images)], np.float32)
        out.append((json.dumps({"prompts": prompts, "array": encode_array(images)}).encode(), expected))
    return out


async def _one(client, url: str, body: bytes, expected: np.ndarray, level: Level) -> None:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(url, content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError:
        level.lost += 1
        return
    level.statuses[r.status_code] = level.statuses.get(r.status_code, 0) + 1
    if r.status_code == 200:
        level.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        scores = np.asarray(r.json().get("scores", []), np.float32)
        if scores.shape != expected.shape or not np.allclose(scores, expected, atol=1e-6):
            level.wrong_scores += 1
    elif r.status_code == 429 and "retry-after" not in r.headers:
        level.refusals_without_retry_after += 1


async def closed_loop(url: str, pool, clients: int, seconds: float) -> float:
    """Throughput (requests/s) of `clients` clients each sending its next request when the last returns."""
    import httpx

    level = Level(0, 0, seconds)
    stop = time.perf_counter() + seconds

    async def client_loop(c: int, client) -> None:
        i = c
        while time.perf_counter() < stop:
            body, expected = pool[i % len(pool)]
            await _one(client, url, body, expected, level)
            i += clients

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    if level.server_errors or level.wrong_scores or level.refused:
        raise RuntimeError(f"capacity probe failed: {level.row()}")
    return level.accepted / elapsed


async def open_loop(url: str, pool, rate: float, seconds: float, factor: float) -> Level:
    """Send at `rate` requests/s on a fixed clock for `seconds`, then wait for every answer."""
    import httpx

    level = Level(factor, rate, seconds)
    n = max(1, int(rate * seconds))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, expected = pool[i % len(pool)]
            tasks.append(asyncio.create_task(_one(client, url, body, expected, level)))
        await asyncio.gather(*tasks)
    return level


def markdown(capacity: float, rows: list[dict]) -> str:
    lines = [f"Capacity (closed loop): {capacity:.1f} requests/s of {IMAGES_PER_REQUEST} images.", "",
             "| level | offered req/s | sent | accepted req/s | p50 ms | p99 ms | refused (429) | 5xx | other | "
             "wrong scores | 429 without Retry-After |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['offered_per_s']:.1f} | {r['sent']} | {r['accepted_per_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['refused_pct']:.0f} % | {r['server_errors']} | "
                     f"{r['other']} | {r['wrong_scores']} | {r['no_retry_after']} |")
    return "\n".join(lines)


def run_levels(levels: list[float], seconds: float, *, port: int, probe_s: float = 4.0) -> tuple[float, list[Level]]:
    """Deploy the verifier with a small queue on the current Ray session, measure capacity, run the levels."""
    from ray import serve

    from reward_servers.app import build_app
    from services.config import RewardServerConfig, RewardSpec

    spec = RewardSpec(name="shapes_verifier", num_cpus=0.5, max_batch_size=4, batch_wait_timeout_s=0.005,
                      max_ongoing_requests=4, max_queued_requests=8)
    server = RewardServerConfig(port=port, auth_token_env="MIXGRPO_LOAD_TEST_NO_TOKEN")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app([spec], server), name="reward_load", route_prefix="/",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}/v1/rewards/shapes_verifier/score"
    pool = requests_pool(64)
    try:
        asyncio.run(closed_loop(url, pool, spec.max_ongoing_requests, 1.0))  # warm-up
        capacity = asyncio.run(closed_loop(url, pool, spec.max_ongoing_requests, probe_s))
        out = [asyncio.run(open_loop(url, pool, factor * capacity, seconds, factor)) for factor in levels]
    finally:
        serve.delete("reward_load")
        serve.shutdown()
    return capacity, out


def main(argv: list[str] | None = None) -> int:
    import socket

    import ray

    from benchmarks.common import publish

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=float, nargs="+", default=[1, 2, 4], help="multiples of the measured capacity")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of offered load per level")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "reward_load.md")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        capacity, levels = run_levels(args.levels, args.seconds, port=free_port())
        rows = [lv.row() for lv in levels]
    finally:
        ray.shutdown()
    head = (f"`python benchmarks/reward_load.py --levels {' '.join(f'{x:g}' for x in args.levels)} --seconds "
            f"{args.seconds:g}`: {os.cpu_count()} CPU cores, 1-min load average at the end {os.getloadavg()[0]:.1f}, "
            f"{time.perf_counter() - t0:.0f} s in all; the verifier with max_ongoing_requests 4, max_queued_requests "
            f"8, open-loop load without retries.\n\n")
    publish(head + markdown(capacity, rows) + "\n", args.out)
    bad = [r for r in rows if r["server_errors"] or r["wrong_scores"] or r["no_retry_after"] or r["other"]]
    print(f"{len(bad)} level(s) with 5xx, wrong scores, lost requests or 429 without Retry-After", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
