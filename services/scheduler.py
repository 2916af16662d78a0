"""The WindowScheduler: the shared source of the current window.

A plain class (made a named Ray actor in `learner/actors.py`). The window is a pure function of the
iteration (`learner.algo.window_at`), so the scheduler's only state is the last iteration it advanced
to; that state lives in a StateStore, and a restarted scheduler reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from learner.algo.window import Window, window_at

from .state_store import open_store


@dataclass(frozen=True)
class WindowSpec:
    """The numbers `window_at` needs (from the `window` and `sampler` config sections)."""

    num_steps: int
    size: int
    shift_interval: int
    stride: int
    strategy: str = "progressive"
    start: int = 0
    shift_interval_min: int = 1
    decay_rate: float = 0.1
    decay_threshold: int = 13
    seed: int = 0

    def window(self, iteration: int) -> Window:
        kw = asdict(self)
        return window_at(iteration, **kw)


class WindowScheduler:
    KEY = "window_scheduler"

    def __init__(self, spec: WindowSpec, store_url: str = "memory", namespace: str = "default") -> None:
        self.spec = spec
        self.store = open_store(store_url, namespace)
        saved = self.store.get(self.KEY)
        if saved is not None and saved.get("spec") != asdict(spec):
            raise ValueError(
                f"the state store {self.store.url} holds a scheduler with a different window spec "
                f"({saved.get('spec')}); use another namespace or the same config"
            )
        self.iteration = -1 if saved is None else int(saved["iteration"])

    def advance(self, iteration: int) -> Window:
        """Move to `iteration` (never backwards), persist it, return its window."""
        if iteration < self.iteration:
            raise ValueError(f"scheduler is at iteration {self.iteration}; cannot go back to {iteration}")
        self.iteration = iteration
        window = self.spec.window(iteration)
        self.store.put(self.KEY, {"iteration": iteration, "window": list(window), "spec": asdict(self.spec)})
        return window

    def current(self) -> tuple[int, Window | None]:
        """The last iteration advanced to and its window (None before the first advance)."""
        return self.iteration, (self.spec.window(self.iteration) if self.iteration >= 0 else None)

    def window(self, iteration: int) -> Window:
        return self.spec.window(iteration)
