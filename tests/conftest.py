"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
