"""A local Ray cluster shared by the integration tests (token auth off, two CPUs, no dashboard)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="mixgrpo-tests", log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
