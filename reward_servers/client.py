"""RewardClient: how rollout workers get rewards, over Serve handles (in-cluster) or HTTP (external).

    client = RewardClient.from_config(cfg.reward.server)           # transport from the config
    scores = client.score("shapes_reward", images, prompts)         # (B, H, W, 3) uint8, B prompts -> (B,)
    future = client.submit("shapes_reward", images, prompts)        # concurrent.futures.Future[(B,)]
    ...sample the next group while this one is scored...
    scores = future.result()

Both transports have the same contract: timeouts; retries with exponential backoff
(`backoff_s · 2^attempt`, at most `max_retries`) on overload (429/503, Serve backpressure), 5xx and
connection errors, waiting at least what a `Retry-After` header asks (capped at 30 s); no retry on other 4xx (the request itself is wrong); a score that did not succeed
raises `RewardError` naming the reward and the cause, never a silent 0. `metrics()` counts requests,
retries and failures for the run's metrics. Over HTTP the images travel as raw uint8 bytes (base64) in
JSON; over handles as numpy arrays through Ray's object transport.

Also here: `LocalRewards`, the same contract scored in-process (tools, reference runs), and `TimedRewards`,
a proxy that reports each request's latency to the run's dashboard metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import httpx
import numpy as np

from reward_servers.payload import encode_array
from services.config import RewardServerConfig, RewardSpec

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RewardError(RuntimeError):
    """A reward could not be computed. `reward`, `cause`, `status` (HTTP code or None), `attempts`."""

    def __init__(self, reward: str, cause: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(f"reward {reward!r} failed after {attempts} attempt(s): {cause}")
        self.reward, self.cause, self.status, self.attempts = reward, cause, status, attempts


class _Retryable(Exception):
    """One attempt failed in a way worth retrying (overload, 5xx, connection, timeout); `retry_after`: seconds the
    server asked to wait (its Retry-After), else None."""

    def __init__(self, cause: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.status, self.retry_after = status, retry_after


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (delta-seconds; an HTTP date or garbage gives None)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class LocalRewards:
    """A reward sink scoring in this process with plain functions (images, prompts) → scores: no Ray, no HTTP.

    For in-process tools and reference runs; `from_specs` builds the same scorers, with the same options, that the
    Serve replicas run (`reward_servers/worker.py`).
    `submit` returns an already completed Future, like `RewardClient.submit`'s.
    """

    def __init__(self, fns: Mapping[str, Callable[[np.ndarray, list[str]], np.ndarray]]) -> None:
        self.fns = dict(fns)

    @classmethod
    def from_specs(cls, specs: Iterable[RewardSpec]) -> LocalRewards:
        from reward_servers.scorers import build_scorer

        return cls({s.name: build_scorer(s.name, s.model_path, **s.options).score for s in specs})

    def submit(self, name: str, images: np.ndarray, prompts: Sequence[str]) -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()
        fut.set_result(np.asarray(self.fns[name](images, list(prompts)), dtype=np.float32))
        return fut


class RewardClient:
    """Scores image batches with named rewards; thread-safe; see the module docstring."""

    def __init__(self, *, transport: Literal["handle", "http"] = "handle", url: str | None = None,
                 app_name: str = "rewards", token: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 4, backoff_s: float = 0.2, max_workers: int = 16,
                 http_transport: httpx.BaseTransport | None = None) -> None:
        if transport == "http" and not url:
            raise ValueError("RewardClient: transport='http' needs a url, e.g. http://127.0.0.1:8000")
        if transport not in ("handle", "http"):
            raise ValueError(f"RewardClient: transport must be 'handle' or 'http', got {transport!r}")
        self.transport, self.app_name = transport, app_name
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url or "http://unused", headers=headers, timeout=timeout_s,
                                  transport=http_transport) if transport == "http" else None
        self._handles: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-client")
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter({k: 0 for k in ("requests", "retries", "failures", "images")})

    @classmethod
    def from_config(cls, server: RewardServerConfig, **kw: Any) -> RewardClient:
        """Client for a RewardServerConfig: its transport, url, timeouts, retries; token from its env var."""
        return cls(transport=server.transport, url=server.url, app_name=server.app_name,
                   token=os.environ.get(server.auth_token_env), timeout_s=server.timeout_s,
                   max_retries=server.max_retries, backoff_s=server.backoff_s, **kw)

    def score(self, name: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images (B, H, W, 3) uint8, B prompts -> (B,) float32. Raises RewardError; ValueError for bad args."""
        images, prompts = _check_args(images, prompts)
        attempt_fn = self._attempt_http if self.transport == "http" else self._attempt_handle
        self._count(name, "requests")
        for attempt in range(self.max_retries + 1):
            try:
                scores = _check_scores(name, attempt_fn(name, images, prompts), len(prompts), attempt + 1)
            except _Retryable as e:
                if attempt == self.max_retries:
                    self._count(name, "failures")
                    raise RewardError(name, str(e), status=e.status, attempts=attempt + 1) from None
                self._count(name, "retries")
                time.sleep(min(max(self.backoff_s * 2**attempt, e.retry_after or 0.0), 30.0))
                continue
            except RewardError:
                self._count(name, "failures")
                raise
            self._count(name, "images", len(prompts))
            return scores
        raise AssertionError("unreachable")

    def submit(self, name: str, images: np.ndarray, prompts: list[str]) -> Future[np.ndarray]:
        """`score` in a background thread: a Future whose result() is (B,) float32 or raises RewardError.

        Async code: `await asyncio.wrap_future(client.submit(...))`.
        """
        return self._pool.submit(self.score, name, images, prompts)

    def metrics(self) -> dict[str, int]:
        """Counters: requests, retries, failures, images, overall and as `<reward>/<counter>`."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- transports

    def _count(self, name: str, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n
            self._counts[f"{name}/{key}"] += n

    def _attempt_http(self, name: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        assert self._http is not None
        try:
            r = self._http.post(f"/v1/rewards/{name}/score", json={"prompts": prompts, "array": encode_array(images)})
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out after {self.timeout_s}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        if r.status_code == 200:
            return np.asarray(_json(r).get("scores"), dtype=np.float32)
        detail = _json(r).get("detail") or r.text[:300]
        cause = f"HTTP {r.status_code}: {detail}"
        if r.status_code in RETRY_STATUS:
            raise _Retryable(cause, r.status_code, retry_after_s(r.headers.get("retry-after")))
        raise RewardError(name, cause, status=r.status_code)

    def _attempt_handle(self, name: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from ray import exceptions as ray_exc
        from ray.serve.exceptions import BackPressureError

        try:
            result = self._handle(name).score.remote(images, prompts).result(timeout_s=self.timeout_s)
        except BackPressureError as e:
            raise _Retryable(f"overloaded: {e}", 429) from None
        except (TimeoutError, ray_exc.GetTimeoutError) as e:
            raise _Retryable(f"timed out after {self.timeout_s}s ({type(e).__name__})") from None
        except (ray_exc.RayActorError, ray_exc.RayTaskError, ray_exc.RaySystemError) as e:
            last = (str(e).strip().splitlines() or [""])[-1]
            raise _Retryable(f"replica error: {type(e).__name__}: {last[:300]}", 500) from None
        if result["error"] is not None:
            raise RewardError(name, f"rejected: {result['error']}", status=422)
        return result["scores"]

    def _handle(self, name: str) -> Any:
        with self._lock:
            if name not in self._handles:
                from ray import serve

                # importing ray.serve sets its logger to INFO; a handle's router then logs a line per process into
                # the job's output. Warnings still show.
                logging.getLogger("ray.serve").setLevel(logging.WARNING)
                try:
                    self._handles[name] = serve.get_deployment_handle(f"reward_{name}", app_name=self.app_name)
                except Exception as e:  # no such app/deployment: a configuration error, not retried
                    raise RewardError(name, f"no deployment reward_{name} in Serve app {self.app_name!r}: {e}") from e
            return self._handles[name]


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _check_args(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a (B, H, W, 3) uint8 array, got {getattr(images, 'shape', type(images))} "
                         f"{getattr(images, 'dtype', '')}")
    prompts = list(prompts)
    if len(prompts) != len(images) or len(prompts) == 0:
        raise ValueError(f"need one prompt per image and at least one image, got {len(prompts)} for {len(images)}")
    return np.ascontiguousarray(images), prompts


def _check_scores(name: str, scores: Any, n: int, attempts: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (n,) or not np.isfinite(scores).all():
        raise RewardError(name, f"server returned {scores.shape} scores (finite: {np.isfinite(scores).all()}) "
                                f"for {n} images", attempts=attempts)
    return scores


class TimedRewards:
    """A RewardSink proxy that observes each request's latency (submit → scores) per reward.

    Wraps a `RewardClient` (whose `submit` returns a concurrent Future) and a `services.telemetry.Telemetry`;
    failed requests are counted by the client itself (`services.telemetry.reward_counter_updates`), not timed here.
    """

    def __init__(self, sink, telemetry, worker: str) -> None:
        self.sink, self.telemetry, self.worker = sink, telemetry, worker

    def submit(self, name: str, images, prompts) -> Future:
        t0 = time.perf_counter()
        future = self.sink.submit(name, images, prompts)

        def done(f: Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.telemetry.observe("mixgrpo_reward_latency_seconds", time.perf_counter() - t0,
                                       reward=name, worker=self.worker)

        future.add_done_callback(done)
        return future
