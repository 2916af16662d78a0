"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, where there is none (the README's test tiers)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SHAPES_PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square",
                  "a cyan circle and a magenta triangle"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and a multi-threaded forward on a shared, loaded 2-core CPU waits
    for its descheduled sibling thread. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny base policy (rollout_workers/assets/tiny_policy)."""
    from learner.driver.build import TINY_CHECKPOINT
    from rollout_workers.policies.tiny import TinyPolicy

    return TinyPolicy.load(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def shapes_batch() -> tuple[np.ndarray, list[str]]:
    """Renders of four prompts, one per category: ((4, 32, 32, 3) uint8, prompts)."""
    from services import shapes_world as sw

    rng = np.random.default_rng(0)
    return np.stack([sw.render(p, rng) for p in SHAPES_PROMPTS]), list(SHAPES_PROMPTS)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the tests that need one (token auth off, two CPUs, no dashboard)."""
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
