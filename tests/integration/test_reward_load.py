"""The reward API under sustained overload (benchmarks/reward_load.py at a small scale, loopback only): at 4× the
measured capacity every accepted request is answered with the verifier's own scores of its images, the excess is
refused with 429 and Retry-After, and nothing is answered 5xx or dropped."""

from __future__ import annotations

import pytest

from benchmarks.reward_load import run_levels
from tests.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~40 s of sustained load: the slow tier


def test_overload_is_refused_with_429_and_every_accepted_request_is_right(ray_cluster):
    capacity, (one, four) = run_levels([1, 4], 2.5, port=free_port(), probe_s=2.0)
    assert capacity > 0
    for level in (one, four):
        row = level.row()
        assert row["server_errors"] == 0 and row["wrong_scores"] == 0 and row["other"] == 0, row
        assert row["no_retry_after"] == 0 and level.accepted > 0, row
    assert four.refused > 0, four.row()  # the excess is refused, not queued without bound
    assert four.accepted + four.refused == four.sent
