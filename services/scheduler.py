"""The WindowScheduler: the shared source of the current window.

A plain class (made a named Ray actor in `learner/driver/actors.py`). The window is a pure function of the
iteration (`learner.algo.window_at` of the `window` config section, the number of sampling steps and the
run seed), so the scheduler's only state is the last iteration it advanced to; that state lives in a
StateStore, and a restarted scheduler reads it back. A run resumed from a checkpoint puts the scheduler
back at the checkpoint's iteration (`restore`): the store follows the checkpoint, never the other way.
"""

from __future__ import annotations

from learner.algo.window import Window, window_at

from .config import WindowConfig
from .state_store import open_store


class WindowScheduler:
    KEY = "window_scheduler"

    def __init__(self, window: WindowConfig, *, num_steps: int, seed: int = 0, store_url: str = "memory",
                 namespace: str = "default") -> None:
        self.config, self.num_steps, self.seed = window, num_steps, seed
        self.store = open_store(store_url, namespace)
        saved = self.store.get(self.KEY)
        if saved is not None and saved.get("schedule") != self.schedule():
            raise ValueError(
                f"the state store {self.store.url} holds a scheduler with another window schedule "
                f"({saved.get('schedule')}); use another namespace or the same config"
            )
        self.iteration = -1 if saved is None else int(saved["iteration"])

    def schedule(self) -> dict:
        """What determines every window: the `window` section, sampler.num_steps and run.seed (JSON)."""
        return {**self.config.model_dump(mode="json"), "num_steps": self.num_steps, "seed": self.seed}

    def window(self, iteration: int) -> Window:
        return window_at(iteration, num_steps=self.num_steps, seed=self.seed, **self.config.model_dump())

    def advance(self, iteration: int) -> Window:
        """Move to `iteration` (never backwards), persist it, return its window."""
        if iteration < self.iteration:
            raise ValueError(f"scheduler is at iteration {self.iteration}; cannot go back to {iteration} "
                             "(a resumed run calls restore(checkpoint iteration) first)")
        return self._move(iteration)

    def restore(self, iteration: int) -> Window | None:
        """Put the scheduler at `iteration` (−1: before the first), forwards or backwards, and persist it.

        For a run that starts from a checkpoint of `iteration` (or from scratch, −1): a persistent store may
        hold a later iteration that a crash did not checkpoint; the windows are a function of the iteration,
        so nothing else needs undoing.
        """
        if iteration < -1:
            raise ValueError(f"iteration must be >= -1, got {iteration}")
        if iteration == -1:
            self.iteration = -1
            self.store.put(self.KEY, {"iteration": -1, "window": None, "schedule": self.schedule()})
            return None
        return self._move(iteration)

    def current(self) -> tuple[int, Window | None]:
        """The last iteration advanced to and its window (None before the first advance)."""
        return self.iteration, (self.window(self.iteration) if self.iteration >= 0 else None)

    def _move(self, iteration: int) -> Window:
        self.iteration = iteration
        window = self.window(iteration)
        self.store.put(self.KEY, {"iteration": iteration, "window": list(window), "schedule": self.schedule()})
        return window
