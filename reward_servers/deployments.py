"""The one module that applies `serve.deployment`: reward replicas with dynamic batching, and the ingress.

    RewardDeployment  one per configured reward: a ScorerWorker behind `@serve.batch`, with the spec's
                      replicas/autoscaling, CPUs/GPUs, max_ongoing_requests and max_queued_requests.
    RewardIngress     the FastAPI app of reward_servers/http_api.py, calling the rewards' handles.

Serve's batcher is declared once on the class with placeholder numbers and re-set per replica from the
spec in `__init__` (`set_max_batch_size` / `set_batch_wait_timeout_s`), so one class serves all rewards.
The model call runs in a worker thread: the replica's event loop keeps accepting requests, so the next
batch fills while the current one computes.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from reward_servers.http_api import BackendOverloaded, create_http_app
from reward_servers.worker import ScorerWorker
from services.config import RewardServerConfig, RewardSpec


def torch_threads(num_cpus: float) -> int:
    """Threads for a replica reserving `num_cpus`: one per whole CPU, at least one.

    Ray sets OMP_NUM_THREADS=1 for fractional replicas; we set torch's count explicitly instead of
    inheriting it, so a 4-CPU replica really uses 4 threads and a 0.25-CPU one does not oversubscribe.
    """
    return max(1, math.floor(num_cpus))


@serve.deployment
class RewardDeployment:
    """One reward model replica; `score` is the handle entry point, batched across concurrent callers."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = RewardSpec.model_validate(spec)
        torch.set_num_threads(torch_threads(self.spec.num_cpus))
        replica = serve.get_replica_context().replica_id.unique_id
        self.worker = ScorerWorker(self.spec, replica_id=replica)
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[np.ndarray], prompts: list[list[str]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.worker.score_many, list(zip(images, prompts, strict=True)))

    async def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        """images (B, H, W, 3) uint8, B prompts -> {"scores": (B,) float32 | None, "error", "batch_size", ...}."""
        return await self._batched(images, prompts)

    def info(self) -> dict[str, Any]:
        return self.worker.info()

    def check_health(self) -> None:
        self.worker.check_health()


class HandleBackend:
    """A reward DeploymentHandle behind the HTTP API's Backend interface."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        try:
            return await self.handle.score.remote(images, prompts)
        except BackPressureError as e:
            raise BackendOverloaded(str(e)) from None

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


@serve.ingress()
class RewardIngress:
    """FastAPI ingress; routes live in http_api.create_http_app, built at replica start."""

    def __init__(self, handles: dict[str, DeploymentHandle], specs: dict[str, dict[str, Any]],
                 server: dict[str, Any], token_sha256: str | None) -> None:
        self.backends = {name: HandleBackend(h) for name, h in handles.items()}
        self.specs = {name: RewardSpec.model_validate(s) for name, s in specs.items()}
        self.server = RewardServerConfig.model_validate(server)
        self.token_sha256 = token_sha256

    def __serve_build_asgi_app__(self) -> Any:
        return create_http_app(self.backends, self.specs, self.server, self.token_sha256)


def reward_deployment(spec: RewardSpec) -> serve.Application:
    """The bound deployment of one reward, named `reward_<name>`, configured from its spec."""
    options: dict[str, Any] = {
        "name": f"reward_{spec.name}",
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "health_check_period_s": 10.0,
        # rollout workers call at hundreds of requests/s: per-request access logs cost measurable CPU on
        # small machines (the ingress still logs every HTTP request)
        "logging_config": {"enable_access_log": False},
    }
    if spec.autoscaling is not None:
        options["autoscaling_config"] = spec.autoscaling
    else:
        options["num_replicas"] = spec.num_replicas
    return RewardDeployment.options(**options).bind(spec.model_dump(mode="json"))


def ingress_deployment(specs: list[RewardSpec], server: RewardServerConfig, token_sha256: str | None,
                       num_cpus: float = 0.1) -> serve.Application:
    """The bound ingress over one reward deployment per spec."""
    handles = {s.name: reward_deployment(s) for s in specs}
    total = sum(s.max_ongoing_requests * (s.num_replicas if s.autoscaling is None else
                                          int(s.autoscaling.get("max_replicas", 1))) for s in specs)
    ingress = serve.deployment(RewardIngress).options(
        name="RewardIngress", ray_actor_options={"num_cpus": num_cpus},
        # the ingress only awaits: let it hold every request the rewards can take, or it caps batching
        max_ongoing_requests=max(256, total))
    return ingress.bind(handles, {s.name: s.model_dump(mode="json") for s in specs},
                        server.model_dump(mode="json"), token_sha256)
