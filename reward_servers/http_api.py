"""The REST API of the reward service: a FastAPI app over a set of reward backends.

    GET  /healthz                      liveness of the ingress
    GET  /v1/rewards                   configured rewards: model, batch settings, replicas, and the observed batches
                                       of the replica that answered ("replica"; Serve routes a call to one)
    POST /v1/rewards/{name}/score      ScoreRequest -> ScoreResponse
    GET  /docs, /openapi.json          OpenAPI

Backends are anything with `async score(images, prompts) -> result dict` and `async info() -> dict`:
Serve DeploymentHandles in production (reward_servers/deployments.py), a ScorerWorker in-process in
tests. Every failure is a JSON `ErrorResponse` with a 4xx/5xx status; the server keeps serving. A reward whose queue
is full (Serve backpressure: `max_queued_requests`) refuses the excess with 429 and `Retry-After`, never a 5xx.
Auth: when a token is configured, /v1/* needs `Authorization: Bearer <token>`; only its SHA-256 is held.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_servers.payload import ErrorResponse, PayloadError, ScoreRequest, ScoreResponse, decode_request
from services.config import RewardServerConfig, RewardSpec


class Backend(Protocol):
    async def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        """images (B, H, W, 3) uint8, B prompts -> ScorerWorker result dict (scores or error)."""
        ...

    async def info(self) -> dict[str, Any]:
        ...


class BackendOverloaded(RuntimeError):
    """The reward's queue is full (Serve backpressure): answer 429 with Retry-After so clients back off."""


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


RETRY_AFTER_S = 1  # what a refused client is told to wait (whole seconds, RFC 9110); the queue drains in well under it


def error_response(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status, headers=headers)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class GuardMiddleware:
    """ASGI middleware run before routing and body parsing: bearer token on /v1/*, request size limit."""

    def __init__(self, app: Any, max_bytes: int, token_sha256: str | None) -> None:
        self.app, self.max_bytes, self.token_sha256 = app, max_bytes, token_sha256

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if self.token_sha256 and path.startswith("/v1/") and not self._authorized(headers):
            return await error_response(401, "unauthorized", "missing or wrong bearer token "
                                        "(send 'Authorization: Bearer <token>')")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(int(length))(scope, receive, send)
        seen, started = 0, False

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(seen)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge as e:
            if not started:
                await self._too_large(e.size)(scope, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token_digest(token.strip()), self.token_sha256)

    def _too_large(self, size: int) -> JSONResponse:
        return error_response(413, "payload_too_large", f"request body of {size} bytes exceeds the limit of "
                                                        f"{self.max_bytes} bytes; split the batch")


class _TooLarge(HTTPException):
    """Raised while a chunked body is read; FastAPI re-raises HTTPExceptions from body reading as they are."""

    def __init__(self, size: int) -> None:
        super().__init__(413, f"request body of more than {size} bytes exceeds the limit; split the batch")
        self.size = size


def _validation_detail(errors: list[dict]) -> tuple[int, str, str]:
    """FastAPI validation errors -> (status, code, message naming the fields)."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, "malformed_json", f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}"
        if tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes | str):
            return 400, "malformed_json", ("request body is not a JSON object; send JSON with "
                                           "'Content-Type: application/json'")
    parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:5]]
    return 422, "invalid_request", "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, detail = _validation_detail(list(exc.errors()))
        errors = json.loads(json.dumps(list(exc.errors()), default=str))  # ctx may hold exceptions
        return error_response(status, code, detail, errors=[{k: e.get(k) for k in ("loc", "msg", "type")}
                                                            for e in errors[:20]])

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        return error_response(exc.status_code, code or f"http_{exc.status_code}", str(exc.detail))


def create_http_app(backends: Mapping[str, Backend], specs: Mapping[str, RewardSpec], server: RewardServerConfig,
                    token_sha256: str | None = None) -> FastAPI:
    """The FastAPI app serving `backends` (name -> Backend), described by their `specs`."""
    app = FastAPI(title="MixGRPO reward service", version="1",
                  description="Reward models on Ray Serve with dynamic batching. Images cross as base64 PNG "
                              "or raw uint8 arrays in JSON. /v1/* needs a bearer token when one is configured.")
    app.add_middleware(GuardMiddleware, max_bytes=server.max_request_bytes, token_sha256=token_sha256)
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False)  # documents the scheme in OpenAPI; GuardMiddleware enforces it
    errors: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 422, 429, 500)}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "rewards": sorted(backends)}

    @app.get("/v1/rewards", dependencies=[Depends(bearer)], responses=errors)
    async def list_rewards() -> dict[str, Any]:
        infos = await asyncio.gather(*(backends[n].info() for n in backends))
        return {"rewards": [_describe(specs[n], info) for n, info in zip(backends, infos)]}

    @app.post("/v1/rewards/{name}/score", response_model=ScoreResponse, dependencies=[Depends(bearer)],
              responses=errors)
    async def score(name: str, body: ScoreRequest) -> ScoreResponse:
        t0 = time.perf_counter()
        if name not in backends:
            raise ApiError(404, "unknown_reward", f"unknown reward {name!r}; served rewards: {sorted(backends)}")
        limits = {"max_side": server.image_size_limit, "max_images": server.max_images_per_request,
                  "max_decoded_bytes": server.max_decoded_bytes}
        try:  # raw arrays decode in microseconds; PNG decoding goes to a thread to keep the loop free
            images, prompts = (decode_request(body, **limits) if body.images is None
                               else await asyncio.to_thread(decode_request, body, **limits))
        except PayloadError as e:
            raise ApiError(e.status, "invalid_payload", str(e)) from None
        result = await _call(backends[name], name, images, prompts)
        if result["error"] is not None:
            raise ApiError(422, "rejected_by_scorer", f"reward {name!r} cannot score this request: "
                                                      f"{_clipped(str(result['error']))}")
        return ScoreResponse(reward=name, scores=[float(s) for s in result["scores"]], num_images=len(prompts),
                             model=result.get("model", name), latency_ms=(time.perf_counter() - t0) * 1e3,
                             batch_size=result["batch_size"], batch_images=result["batch_images"],
                             replica=result.get("replica", ""))

    return app


async def _call(backend: Backend, name: str, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
    try:
        return await backend.score(images, prompts)
    except BackendOverloaded:
        raise ApiError(429, "overloaded", f"reward {name!r} is at capacity (its queue is full); retry after "
                                          f"{RETRY_AFTER_S} s") from None
    except Exception as e:  # a crashed replica or model: 500, and the ingress keeps serving
        last = str(e).strip().splitlines()[-1:] or [""]
        raise ApiError(500, "scoring_failed", f"reward {name!r} failed: {type(e).__name__}: {last[0][:500]}") from None


def _clipped(text: str, limit: int = 500) -> str:
    """An error message that may quote a client's input (a 100 KB prompt) kept short: the head, then how much more."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _describe(spec: RewardSpec, info: dict[str, Any]) -> dict[str, Any]:
    return {**info, "name": spec.name, "weight": spec.weight, "num_replicas": spec.num_replicas,
            "autoscaling": spec.autoscaling, "max_batch_size": spec.max_batch_size,
            "batch_wait_timeout_s": spec.batch_wait_timeout_s, "max_ongoing_requests": spec.max_ongoing_requests,
            "max_queued_requests": spec.max_queued_requests, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
