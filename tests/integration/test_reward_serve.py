"""The reward service on a real local Ray + Serve: scores, batching, replicas, bad inputs, auth, client.

One Serve app for the module (≈ the cost of the file), on the session's 2-CPU Ray (conftest.py): the
learned shapes reward with 2 replicas and the rule verifier, fractional CPUs, behind a bearer token. The client's retry logic is tested
against an httpx MockTransport (no server needed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from reward_servers.app import app_builder, build_app
from reward_servers.client import RewardClient, RewardError
from reward_servers.payload import encode_array, encode_png
from reward_servers.scorers import build_scorer
from services import shapes_world as sw
from services.config import RewardServerConfig, RewardSpec

pytestmark = pytest.mark.integration

TOKEN = "integration-test-token"
TOKEN_ENV = "MIXGRPO_TEST_REWARD_TOKEN"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    url: str
    server: RewardServerConfig
    headers: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster) -> Iterator[Service]:
    """The reward app on the session's local Ray (tests/integration/conftest.py: 2 CPUs, auth off)."""
    from ray import serve

    saved = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN  # read by build_app, on this side
    port = _free_port()
    server = RewardServerConfig(port=port, auth_token_env=TOKEN_ENV, max_request_bytes=2**21,
                                max_images_per_request=64)
    specs = [RewardSpec(name="shapes_reward", num_replicas=2, num_cpus=0.25, max_batch_size=32,
                        batch_wait_timeout_s=0.05),
             RewardSpec(name="shapes_verifier", num_cpus=0.25, max_batch_size=8)]
    serve.shutdown()  # a Serve instance left by another module would keep its own HTTP port
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(specs, server), name=server.app_name, route_prefix="/")
        yield Service(f"http://127.0.0.1:{port}", server, {"Authorization": f"Bearer {TOKEN}"})
    finally:
        serve.shutdown()
        if saved is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = saved


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, list[str]]:
    """Renders of 4 prompts followed by 4 corruptions of them: (8, 32, 32, 3) uint8, 8 prompts."""
    rng = np.random.default_rng(0)
    prompts = sw.sample_prompts(4, rng, split="heldout")
    renders = [sw.render(p, rng) for p in prompts]
    broken = [sw.corrupt(p, im, rng, "recolor") for p, im in zip(prompts, renders)]
    return np.stack(renders + broken), prompts + prompts


def _post(svc: Service, body: dict | bytes, name: str = "shapes_reward", headers: dict | None = None) -> httpx.Response:
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    hdrs = {**svc.headers, **kw.pop("headers", {}), **(headers or {})}
    return httpx.post(f"{svc.url}/v1/rewards/{name}/score", headers=hdrs, timeout=30, **kw)


# ------------------------------------------------------------------------------------------- scores


def test_http_scores_match_the_scorers(service, batch):
    images, prompts = batch
    verifier = _post(service, {"prompts": prompts, "array": encode_array(images)}, "shapes_verifier").json()
    assert verifier["scores"][:4] == [1.0] * 4
    assert np.allclose(verifier["scores"], [sw.verify(p, im).score for p, im in zip(prompts, images)])
    png = _post(service, {"prompts": prompts, "images": [encode_png(im) for im in images]}).json()
    local = build_scorer("shapes_reward").score(images, prompts)
    assert png["reward"] == "shapes_reward" and png["num_images"] == 8 and png["latency_ms"] > 0
    assert np.allclose(png["scores"], local, atol=1e-4)


def test_handle_and_http_clients_agree(service, batch):
    images, prompts = batch
    local = build_scorer("shapes_reward").score(images, prompts)
    with RewardClient(transport="handle", app_name=service.server.app_name) as handle_client:
        assert np.allclose(handle_client.score("shapes_reward", images, prompts), local, atol=1e-4)
        futures = [handle_client.submit("shapes_reward", images[i:i + 2], prompts[i:i + 2]) for i in range(0, 8, 2)]
        assert np.allclose(np.concatenate([f.result(timeout=30) for f in futures]), local, atol=1e-4)
        with pytest.raises(RewardError, match="shapes_reward.*outside the shapes grammar"):
            handle_client.score("shapes_reward", images[:1], ["a red blob"])
    with RewardClient(transport="http", url=service.url, token=TOKEN) as http_client:
        assert np.allclose(http_client.score("shapes_verifier", images, prompts)[:4], 1.0)
        assert http_client.metrics()["requests"] == 1 and http_client.metrics().get("retries", 0) == 0


def test_concurrent_requests_are_batched_across_two_replicas(service, batch):
    images, prompts = batch
    body = {"prompts": prompts[:4], "array": encode_array(images[:4])}

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=service.url, headers=service.headers, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/rewards/shapes_reward/score", json=body) for _ in range(32)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:1]
        return [r.json() for r in rs]

    results = [r for _ in range(2) for r in asyncio.run(burst())]
    assert max(r["batch_size"] for r in results) > 1
    assert len({r["replica"] for r in results}) == 2
    assert all(np.allclose(r["scores"], results[0]["scores"], atol=1e-4) for r in results)
    listing = httpx.get(f"{service.url}/v1/rewards", headers=service.headers).json()["rewards"]
    reward = next(r for r in listing if r["name"] == "shapes_reward")
    assert reward["num_replicas"] == 2 and reward["max_batch_size"] == 32 and reward["model"]["params"] > 0


def test_health_docs_and_listing(service):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok",
                                                         "rewards": ["shapes_reward", "shapes_verifier"]}
    assert httpx.get(f"{service.url}/docs").status_code == 200
    assert "/v1/rewards/{name}/score" in httpx.get(f"{service.url}/openapi.json").json()["paths"]


# --------------------------------------------------------------------------------------- bad inputs


def _png(mode: str, size: tuple[int, int] = (32, 32)) -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


GOOD = np.zeros((1, 32, 32, 3), np.uint8)
NAN = {"dtype": "float32", "shape": [1, 32, 32, 3],
       "data": base64.b64encode(np.full((1, 32, 32, 3), np.nan, np.float32).tobytes()).decode()}
BAD_INPUTS = {  # case: (body, reward name, headers, status, error code, words in detail)
    "malformed_json": (b'{"prompts": [', "shapes_reward", None, 400, "malformed_json", "not valid JSON"),
    "wrong_types": ({"prompts": "a red circle", "array": encode_array(GOOD)}, "shapes_reward", None, 422,
                    "invalid_request", "prompts"),
    "invalid_base64": ({"prompts": ["a red circle"], "images": ["%%%"]}, "shapes_reward", None, 422,
                       "invalid_payload", "not valid base64"),
    "not_an_image": ({"prompts": ["a red circle"], "images": [base64.b64encode(b"GIF? no").decode()]},
                     "shapes_reward", None, 422, "invalid_payload", "not an image file"),
    "wrong_size": ({"prompts": ["a red circle"], "images": [_png("RGB", (16, 16))]}, "shapes_reward", None, 422,
                   "rejected_by_scorer", "32x32"),
    "wrong_channels_png": ({"prompts": ["a red circle"], "images": [_png("RGBA")]}, "shapes_reward", None, 422,
                           "invalid_payload", "4 channels"),
    "wrong_channels_array": ({"prompts": ["a red circle"], "array": encode_array(np.zeros((1, 32, 32, 1), np.uint8))},
                             "shapes_reward", None, 422, "invalid_payload", "1 channels"),
    "nan_array": ({"prompts": ["a red circle"], "array": NAN}, "shapes_reward", None, 422, "invalid_payload", "NaN"),
    "float64_array": ({"prompts": ["a red circle"], "array": {**encode_array(GOOD), "dtype": "float64"}},
                      "shapes_reward", None, 422, "invalid_request", "dtype"),
    "empty_batch": ({"prompts": [], "images": []}, "shapes_reward", None, 422, "invalid_payload", "empty batch"),
    "count_mismatch": ({"prompts": ["a red circle"] * 2, "array": encode_array(GOOD)}, "shapes_reward", None, 422,
                       "invalid_payload", "counts must match"),
    "too_many_images": ({"prompts": ["a red circle"] * 65, "array": encode_array(np.zeros((65, 32, 32, 3), np.uint8))},
                        "shapes_reward", None, 413, "invalid_payload", "at most 64"),  # too large, as bytes are
    "oversized": ({"prompts": ["a red circle"] * 40, "array": encode_array(np.zeros((40, 128, 128, 3), np.uint8))},
                  "shapes_reward", None, 413, "payload_too_large", "exceeds the limit"),
    "unknown_reward": ({"prompts": ["a red circle"], "array": encode_array(GOOD)}, "nope", None, 404,
                       "unknown_reward", "nope"),
    "missing_token": ({"prompts": ["a red circle"], "array": encode_array(GOOD)}, "shapes_reward",
                      {"Authorization": ""}, 401, "unauthorized", "bearer token"),
    "wrong_token": ({"prompts": ["a red circle"], "array": encode_array(GOOD)}, "shapes_reward",
                    {"Authorization": "Bearer nope"}, 401, "unauthorized", "bearer token"),
    "out_of_grammar": ({"prompts": ["a purple circle"], "array": encode_array(GOOD)}, "shapes_verifier", None, 422,
                       "rejected_by_scorer", "outside the shapes grammar"),
    # a 100 KB prompt was echoed whole into the error: now its head and a count
    "huge_prompt": ({"prompts": ["purple " * 15000], "array": encode_array(GOOD)}, "shapes_verifier", None, 422,
                    "rejected_by_scorer", "more characters)"),
    "bool_in_shape": ({"prompts": ["a red circle"], "array": {**encode_array(GOOD), "shape": [True, 32, 32, 3]}},
                      "shapes_reward", None, 422, "invalid_request", "integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_json_4xx_and_the_server_keeps_serving(service, batch, case):
    body, name, headers, status, code, words = BAD_INPUTS[case]
    r = _post(service, body, name, headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == code and words in r.json()["detail"] and len(r.text) < 2000, r.json()
    images, prompts = batch
    ok = _post(service, {"prompts": prompts[:2], "array": encode_array(images[:2])})
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 2


def test_token_is_not_needed_for_health_and_docs(service):
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    assert httpx.get(f"{service.url}/v1/rewards").status_code == 401


# ------------------------------------------------------------------------------- client retry logic


def _stub(statuses: list[int | str], n: int = 2) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A fake reward server answering the i-th call with statuses[i] ("conn": connection refused)."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = statuses[min(len(calls), len(statuses)) - 1]
        if status == "conn":
            raise httpx.ConnectError("connection refused", request=request)
        if status == 200:
            return httpx.Response(200, json={"scores": [0.25] * n})
        return httpx.Response(status, json={"error": "x", "detail": f"stub says {status}"})

    return httpx.MockTransport(handler), calls


def _client(transport: httpx.MockTransport, retries: int = 3) -> RewardClient:
    return RewardClient(transport="http", url="http://stub", max_retries=retries, backoff_s=0.001,
                        http_transport=transport)


@pytest.mark.parametrize("statuses, retries", [([503, 429, 200], 2), (["conn", 500, 200], 2), ([200], 0)])
def test_client_retries_overload_5xx_and_connection_errors(statuses, retries):
    transport, calls = _stub(statuses)
    with _client(transport) as client:
        scores = client.score("shapes_reward", np.zeros((2, 32, 32, 3), np.uint8), ["a red circle"] * 2)
        assert scores.tolist() == [0.25, 0.25] and len(calls) == retries + 1
        assert client.metrics()["retries"] == retries and client.metrics().get("failures", 0) == 0
    body = calls[-1].read().decode()
    assert '"array"' in body and '"dtype":"uint8"' in body.replace(" ", "")  # raw bytes in JSON, no pickle


def test_client_waits_what_retry_after_asks(monkeypatch):
    """A 429 with Retry-After: 2 makes the client wait 2 s (not its 1 ms backoff) before trying again."""
    import reward_servers.client as client_module

    slept, calls = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, json={"error": "overloaded", "detail": "full"}, headers={"Retry-After": "2"})
        return httpx.Response(200, json={"scores": [0.5, 0.5]})

    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    with _client(httpx.MockTransport(handler)) as client:
        assert client.score("shapes_reward", np.zeros((2, 32, 32, 3), np.uint8), ["a"] * 2).tolist() == [0.5, 0.5]
    assert slept == [2.0] and len(calls) == 2
    assert client_module.retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") is None  # a date: the backoff applies


@pytest.mark.parametrize("statuses, calls_expected, status", [([400], 1, 400), ([422], 1, 422),
                                                               ([503], 4, 503), ([200], 1, None)])
def test_client_raises_reward_error_never_zero(statuses, calls_expected, status):
    transport, calls = _stub(statuses, n=3)  # [200] answers 3 scores for 2 images: also an error
    with _client(transport) as client, pytest.raises(RewardError, match="reward 'shapes_reward'") as e:
        client.submit("shapes_reward", np.zeros((2, 32, 32, 3), np.uint8), ["a red circle"] * 2).result()
    assert len(calls) == calls_expected and e.value.status == status
    assert client.metrics()["failures"] == 1


# -------------------------------------------------------------------------------------- app builder


def test_serve_config_file_and_builder_args(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy" / "serve_rewards.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    assert app_builder(config["applications"][0]["args"]) is not None
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({"reward": {"rewards": [{"name": "jpeg_compressibility"}]}}))
    assert app_builder({"config": str(run_cfg)}) is not None
    scaled = RewardSpec(name="shapes_verifier", autoscaling={"min_replicas": 1, "max_replicas": 3})
    assert build_app([scaled], RewardServerConfig()) is not None
    with pytest.raises(ValueError, match="unknown reward scorer.*known scorers"):
        build_app([RewardSpec(name="nope")], RewardServerConfig())
