"""Property-based fuzzing of the reward REST API: no input makes it answer 5xx.

schemathesis reads the app's own OpenAPI schema and generates requests for every operation (valid by the
schema and deliberately invalid: wrong types, missing fields, odd strings and numbers, bad headers); a
Hypothesis test adds what the schema cannot express (well-formed image arrays with arbitrary prompts and
shapes), so the decoders and the scorer behind them are fuzzed too. The app is the production FastAPI app
(`create_http_app`, with the bearer-token guard and size limits) served in-process over ASGI, with the rule
verifier as an in-process backend: no Ray, no network, a few seconds per operation.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from reward_servers.http_api import create_http_app, token_digest
from reward_servers.worker import LocalBackend, ScorerWorker
from services.config import RewardServerConfig, RewardSpec

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER = RewardServerConfig(max_request_bytes=2**16, max_images_per_request=8, image_size_limit=64)


def reward_app():
    spec = RewardSpec(name="shapes_verifier")
    backends = {spec.name: LocalBackend(ScorerWorker(spec))}
    return create_http_app(backends, {spec.name: spec}, SERVER, token_digest(TOKEN))


APP = reward_app()
CLIENT = TestClient(APP)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx(case):
    """Every operation of the schema: answers are documented status codes with JSON bodies, never 5xx."""
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance])


GRAMMAR = ["a red circle", "two blue squares above a green circle", "three white triangles", "a cyan square left of"]
PROMPTS = st.one_of(st.sampled_from(GRAMMAR), st.text(max_size=40))  # mostly in the grammar: reach the scorer


@st.composite
def array_bodies(draw):
    """A well-formed `array` body (data length matches the shape) with arbitrary prompts, shapes and values.

    Half the time a decodable 32×32 RGB batch with one prompt per image, so most examples reach the scorer.
    """
    b = draw(st.integers(1, 3))
    valid = draw(st.booleans())
    h, w, c = (32, 32, 3) if valid else (draw(st.integers(1, 70)), draw(st.integers(1, 70)), draw(st.sampled_from([1, 3, 4])))
    if draw(st.booleans()):
        dtype, data = "uint8", np.frombuffer(draw(st.binary(min_size=b * h * w * c, max_size=b * h * w * c)), np.uint8)
    else:
        value = draw(st.sampled_from([0.0, 0.25, 1.0, 2.0, -1.0, float("nan"), float("inf")]))
        dtype, data = "float32", np.full(b * h * w * c, value, np.float32)
    n = b if valid else draw(st.integers(0, b + 1))
    prompts = draw(st.lists(PROMPTS, min_size=n, max_size=n))
    return {"prompts": prompts, "array": {"dtype": dtype, "shape": [b, h, w, c],
                                          "data": base64.b64encode(data.tobytes()).decode()}}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=array_bodies())
def test_well_formed_arrays_with_any_prompts_never_get_a_5xx(body):
    """Decodable images reach the scorer; whatever the prompts, shapes or values: 200 with finite scores or 4xx."""
    r = CLIENT.post("/v1/rewards/shapes_verifier/score", json=body, headers=AUTH)
    assert r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code == 200:
        scores = r.json()["scores"]
        assert len(scores) == len(body["prompts"]) and all(0.0 <= s <= 1.0 for s in scores)
    else:
        assert r.status_code in (400, 413, 422) and r.json()["detail"], r.text
