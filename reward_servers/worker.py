"""ScorerWorker: a scorer plus the merge/split logic of dynamic batching, as a plain class (no Serve).

`score_many` receives the requests that Serve's `@serve.batch` gathered, runs the model once per image
size on the concatenated images, and splits the scores back. A request the scorer refuses (ValueError:
bad prompt, wrong image size) must not fail its batch-mates, so when a merged call raises ValueError the
group is re-scored request by request and only the offending requests get an error.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_servers.scorers import Scorer, build_scorer
from services.config import RewardSpec

Request = tuple[np.ndarray, list[str]]  # (images (B, H, W, 3) uint8, B prompts)


def ok_result(scores: np.ndarray, batch_size: int, batch_images: int) -> dict[str, Any]:
    return {"scores": np.asarray(scores, dtype=np.float32), "error": None,
            "batch_size": batch_size, "batch_images": batch_images}


def error_result(message: str, batch_size: int) -> dict[str, Any]:
    return {"scores": None, "error": message, "batch_size": batch_size, "batch_images": 0}


class ScorerWorker:
    """Owns one scorer; scores lists of requests; remembers what it did (for /v1/rewards and health)."""

    def __init__(self, spec: RewardSpec, replica_id: str | None = None, scorer: Scorer | None = None) -> None:
        self.spec = spec
        self.scorer = scorer if scorer is not None else build_scorer(spec.name, spec.model_path, **spec.options)
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}"
        self.batch_sizes: list[int] = []  # requests per model call, most recent last (bounded)
        self.consecutive_crashes = 0
        self.num_requests = 0
        self.num_batches = 0
        desc = self.scorer.info()
        self.model_label = " ".join(str(desc[k]) for k in ("architecture", "path") if k in desc) or spec.name

    def score_many(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
        """Score a batch of requests -> one result dict per request, in order.

        result = {"scores": (B_i,) float32 | None, "error": str | None, "batch_size", "batch_images"}.
        ValueErrors become per-request errors; any other exception propagates (a broken replica).
        """
        n = len(requests)
        self.num_requests += n
        self.num_batches += 1
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]
        results: list[dict[str, Any] | None] = [None] * n
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (images, _prompts) in enumerate(requests):
            if not isinstance(images, np.ndarray) or images.ndim != 4:
                results[i] = error_result(f"images must be a (B, H, W, 3) array, got {type(images).__name__}", n)
                continue
            groups.setdefault(images.shape[1:], []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._score_group([requests[i] for i in idx], n), strict=True):
                results[i] = res
        return [self.annotate(r) for r in results]  # type: ignore[arg-type]

    def _score_group(self, group: list[Request], batch_size: int) -> list[dict[str, Any]]:
        """Requests whose images share a size: one merged call, or one call each if that raises ValueError."""
        images = np.concatenate([im for im, _ in group]) if len(group) > 1 else group[0][0]
        prompts = [p for _, ps in group for p in ps]
        try:
            scores = self._call(images, prompts)
        except ValueError:
            if len(group) == 1:
                return [self._score_one(group[0], batch_size)]
            return [self._score_one(r, batch_size) for r in group]
        splits = np.cumsum([len(im) for im, _ in group])[:-1]
        return [ok_result(s, batch_size, len(images)) for s in np.split(scores, splits)]

    def _score_one(self, request: Request, batch_size: int) -> dict[str, Any]:
        try:
            return ok_result(self._call(*request), batch_size, len(request[0]))
        except ValueError as e:
            return error_result(str(e), batch_size)

    def _call(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """The scorer call, with its output checked: (B,) finite float32 (a NaN reward is a server bug)."""
        try:
            scores = np.asarray(self.scorer.score(images, prompts), dtype=np.float32)
        except ValueError:
            self.consecutive_crashes = 0
            raise
        except Exception:
            self.consecutive_crashes += 1
            raise
        self.consecutive_crashes = 0
        if scores.shape != (len(prompts),) or not np.isfinite(scores).all():
            raise RuntimeError(f"scorer {self.spec.name} returned {scores.shape} scores with non-finite "
                               f"values or the wrong count for {len(prompts)} images")
        return scores

    def check_health(self, max_crashes: int = 3) -> None:
        """Raise if the last `max_crashes` model calls all crashed (Serve then replaces the replica)."""
        if self.consecutive_crashes >= max_crashes:
            raise RuntimeError(f"reward {self.spec.name}: {self.consecutive_crashes} model calls in a row failed")

    def annotate(self, result: dict[str, Any]) -> dict[str, Any]:
        """Add the replica id and model label to a result (what the HTTP response reports)."""
        return {**result, "replica": self.replica_id, "model": self.model_label}

    def info(self) -> dict[str, Any]:
        """Name, model description, batch settings and what this replica has seen."""
        recent = self.batch_sizes[-200:]
        return {"name": self.spec.name, "model": self.scorer.info(), "replica": self.replica_id,
                "max_batch_size": self.spec.max_batch_size, "batch_wait_timeout_s": self.spec.batch_wait_timeout_s,
                "num_requests": self.num_requests, "num_batches": self.num_batches,
                "max_observed_batch_size": max(recent, default=0),
                "mean_observed_batch_size": float(np.mean(recent)) if recent else 0.0,
                "time": time.time()}


class LocalBackend:
    """A ScorerWorker behind the HTTP API's Backend interface, in-process (no Ray, no batching)."""

    def __init__(self, worker: ScorerWorker) -> None:
        self.worker = worker

    async def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        return (await asyncio.to_thread(self.worker.score_many, [(images, prompts)]))[0]

    async def info(self) -> dict[str, Any]:
        return self.worker.info()
