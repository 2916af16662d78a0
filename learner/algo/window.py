"""The sliding window: which denoising steps are stochastic (SDE) and trained at iteration m.

A pure function of the iteration (and the run seed for `random`), so every worker agrees and a
restart needs only the iteration number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from .seeding import Stream, seeded_generator

Strategy = Literal["progressive", "frozen", "random", "linear_decay", "exp_decay"]
STRATEGIES: tuple[str, ...] = ("progressive", "frozen", "random", "linear_decay", "exp_decay")


class Window(NamedTuple):
    start: int  # l, first SDE step
    size: int  # w

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)

    @property
    def last(self) -> int:
        return self.stop - 1


def _walk(iteration: int, start: int, max_start: int, stride: int, interval: Callable[[int], int]) -> int:
    """Window start after `iteration` iterations when it stays interval(l) iterations at position l."""
    pos, elapsed = start, 0
    while pos < max_start and stride > 0:
        stay = interval(pos)
        if iteration < elapsed + stay:
            return pos
        elapsed += stay
        pos = min(pos + stride, max_start)
    return pos


def _random_start(iteration: int, seed: int, max_start: int) -> int:
    # a stream of its own per (run seed, iteration): every worker and a restarted run draw the same start
    gen = seeded_generator(seed, Stream.WINDOW, iteration)
    return int(torch.randint(0, max_start + 1, (1,), generator=gen))


def window_at(
    iteration: int, *, num_steps: int, size: int, shift_interval: int, stride: int,
    strategy: Strategy = "progressive", seed: int = 0, start: int = 0, shift_interval_min: int = 1,
    decay_rate: float = 0.1, decay_threshold: int = 13,
) -> Window:
    """The window W(l) = {l, …, l+w−1} used at `iteration` (0-based).

    Trainable steps are 0 … N−2 (the last step is never trained), so l ≤ N−1−w.
    - progressive: l = min(start + stride·⌊m/τ⌋, N−1−w), holding at the end.
    - frozen: l = start.
    - random: uniform l ∈ [0, N−1−w], seeded by (seed, iteration).
    - linear_decay: τ(l) falls linearly from shift_interval to shift_interval_min as l goes to N−1−w.
    - exp_decay: τ(l) = ⌈τ·exp(−k·max(0, l − l_thr))⌉ with k = decay_rate, l_thr = decay_threshold.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 1 <= size <= num_steps - 1:
        raise ValueError(f"window size must be in [1, {num_steps - 1}] for {num_steps} steps, got {size}")
    if shift_interval < 1 or stride < 0:
        raise ValueError("shift_interval must be >= 1 and stride >= 0")
    max_start = num_steps - 1 - size
    if not 0 <= start <= max_start:
        raise ValueError(f"window start must be in [0, {max_start}], got {start}")
    if strategy == "progressive":
        return Window(min(start + stride * (iteration // shift_interval), max_start), size)
    if strategy == "frozen":
        return Window(start, size)
    if strategy == "random":
        return Window(_random_start(iteration, seed, max_start), size)
    if strategy == "linear_decay":
        span = max(max_start - start, 1)

        def interval(pos: int) -> int:
            frac = (pos - start) / span
            return max(1, round(shift_interval - (shift_interval - shift_interval_min) * frac))

        return Window(_walk(iteration, start, max_start, stride, interval), size)
    if strategy == "exp_decay":

        def interval(pos: int) -> int:
            return max(1, math.ceil(shift_interval * math.exp(-decay_rate * max(0, pos - decay_threshold))))

        return Window(_walk(iteration, start, max_start, stride, interval), size)
    raise ValueError(f"unknown window strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
