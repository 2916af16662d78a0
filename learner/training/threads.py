"""Elastic torch threads for an update that overlaps a rollout (async mode).

In async mode the rollout of iteration m+1 runs beside the update of m, so each side has its share of the
node's cores. The rollout usually ends first; from then its cores idle until the next rollout starts. A
`ThreadBoost` is asked before every micro-batch whether the overlapping work is done (`done()`), and the first
time it is, raises this process's torch threads by `extra` for the rest of the update; `restore()` puts the
count back (the next update starts beside the next rollout).

    boost = ThreadBoost(done=lambda: all_ready(refs), extra=2)
    try:
        learner.update(batch, between=boost)
    finally:
        boost.restore()
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ThreadBoost:
    def __init__(self, done: Callable[[], bool], extra: int) -> None:
        if extra < 0:
            raise ValueError(f"extra threads must be >= 0, got {extra}")
        self.done, self.extra = done, extra
        self.base = torch.get_num_threads()
        self.calls = 0
        self.boosted_at: int | None = None  # the call (micro-batch index) at which the threads were raised

    def __call__(self) -> None:
        """Before micro-batch `self.calls`: raise the threads once the overlapping work is done."""
        if self.extra and self.boosted_at is None and self.done():
            torch.set_num_threads(self.base + self.extra)
            self.boosted_at = self.calls
        self.calls += 1

    def restore(self) -> None:
        if torch.get_num_threads() != self.base:
            torch.set_num_threads(self.base)

    def stats(self) -> dict:
        """-> {"overlap_boost_at": the micro-batch (counted from 0) that first ran with the added threads (-1: none),
        "overlap_boost_frac": the fraction of the update's micro-batches that ran with them}. Micro-batches are this
        process's own: a rank of a K-rank learner counts those it computes."""
        if self.boosted_at is None:
            return {"overlap_boost_at": -1, "overlap_boost_frac": 0.0}
        return {"overlap_boost_at": self.boosted_at, "overlap_boost_frac": (self.calls - self.boosted_at) / self.calls}
