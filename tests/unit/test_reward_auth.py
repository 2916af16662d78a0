"""The reward API's bearer token: compared in constant time (hmac.compare_digest over SHA-256 digests of equal
length; the app holds only the digest), and never echoed: not in any error body or header, not in any log record,
whatever the request (a wrong token that contains the right one, the right one with a bad payload, …)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

import reward_servers.http_api as http_api
from reward_servers.payload import encode_array
from reward_servers.worker import LocalBackend, ScorerWorker
from services.config import RewardServerConfig, RewardSpec

TOKEN = "s3cret-Token-4-tests"


@pytest.fixture(scope="module")
def client():
    spec = RewardSpec(name="shapes_verifier")
    app = http_api.create_http_app({spec.name: LocalBackend(ScorerWorker(spec))}, {spec.name: spec},
                                   RewardServerConfig(max_request_bytes=16384), http_api.token_digest(TOKEN))
    return TestClient(app)


def body(n=1):
    return {"prompts": ["a red circle"] * n, "array": encode_array(np.zeros((n, 32, 32, 3), np.uint8))}


def test_token_is_compared_in_constant_time_as_digests(client, monkeypatch):
    seen = []
    real = http_api.hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", spy)
    for sent, status in ((TOKEN, 200), ("wrong", 401), (TOKEN[:-1], 401)):
        r = client.post("/v1/rewards/shapes_verifier/score", json=body(), headers={"Authorization": f"Bearer {sent}"})
        assert r.status_code == status
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert [b for _, b in seen] == [digest] * 3  # the stored value is the digest, never the token
    assert [a for a, _ in seen] == [hashlib.sha256(s.encode()).hexdigest() for s in (TOKEN, "wrong", TOKEN[:-1])]
    assert all(len(a) == len(b) == 64 for a, b in seen)  # equal lengths: the time does not depend on a prefix


def test_token_never_appears_in_error_bodies_headers_or_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    right = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("/v1/rewards/shapes_verifier/score", {"Authorization": f"Bearer {TOKEN}x"}, body(), 401),  # contains it
        ("/v1/rewards/shapes_verifier/score", {"Authorization": TOKEN}, body(), 401),  # no scheme
        ("/v1/rewards/nope/score", right, body(), 404),
        ("/v1/rewards/shapes_verifier/score", right, {"prompts": ["a"], "array": {"dtype": "uint8"}}, 422),
        ("/v1/rewards/shapes_verifier/score", right, body(8), 413),  # past max_request_bytes
        ("/v1/rewards/shapes_verifier/score", right, {"prompts": [TOKEN], "images": ["bad"]}, 422),
    ]
    for path, headers, payload, status in cases:
        r = client.post(path, json=payload, headers=headers)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.json()["error"] and r.json()["detail"]
        if TOKEN not in str(payload):
            assert TOKEN not in r.text, r.text
        assert not any(TOKEN in v for v in r.headers.values())
    assert caplog.records is not None and TOKEN not in caplog.text
