"""Floors: the seconds an iteration would take with zero overhead and every core busy, from two unit costs.

The unit costs are measured in the same run on the same machine, in core-seconds (wall seconds × the cores the
measurement kept busy):

    c_eval   one image model-evaluation in the rollout (one velocity of one image, at the rollout's batch size)
    c_train  one trained sample-step in the learner (forward + backward of one row's transition)

An iteration of a method spends E image evaluations (its metrics' `image_evals`: the shared pre-window prefix and
the window's first step count once per group) and T trained sample-steps (`forward_rows`: the rows the learner's
forward computed, rows × steps per row × epochs less the first window steps a micro-batch's group members shared;
`trained_sample_steps` without sharing).
On C cores:

    rollout floor   R = E·c_eval / C                          the rollout alone, every core busy
    update floor    U = T·c_train / C                         the update alone, every core busy
    sync floor      F = R + U                                 the phases follow each other
    async floor     F = max(E·c_eval / C_r, T·c_train / C_l)  overlapped: the rollout on C_r cores, the learner on C_l

On one machine the overlapped phases share its cores, C_r + C_l = C, and the best split
C_r = C·E·c_eval / (E·c_eval + T·c_train) makes both terms R + U: overlapping cannot beat the sync floor where
each phase keeps every core busy; it hides only what a phase leaves idle (a one-thread learner, a rollout
waiting for rewards). With C cores each (rollout and learner on separate devices) the async floor is max(R, U).

A method's floor ratio is F(method) / F(DanceGRPO) at the same unit costs, and a measured time (or ratio)
more than 10 % above its floor is flagged (`above_floor`).

What the work allows. A sync floor ratio (E·c_eval + T·c_train) / (E_D·c_eval + T_D·c_train) is a weighted mean
of the work ratios E/E_D and T/T_D, so whatever the unit costs it lies between them: a target below
min(E/E_D, T/T_D) needs less work, not less overhead. At the paper's shape with the first window step shared
(rollout: once per group; learner: once per group in a micro-batch of 16, `learner.update_order=by_group`),
DanceGRPO does E_D = 8 + 96·24 = 2312 and T_D ≈ 1300, Flash* E = 8 + 96·7 = 680 and T = 6·(64 − 14) = 300:
E/E_D = 0.294, T/T_D = 0.231, so Flash*'s floor ratio is in [0.231, 0.294] on any machine (0.25 at c_train /
c_eval ≈ 3, the ratio measured here).

Worked example: the paper's shape (N = 25, G = 12, 96 images = 8 groups per iteration, DanceGRPO training 14 of
25 steps), C = 2 cores, c_eval = 2 ms, c_train = 10 ms:

    DanceGRPO         E = 96·25 = 2400, T = 96·14 = 1344    R = 2.4 s, U = 6.72 s    F = 9.12 s   ratio 1
    MixGRPO, l = 0    E = 2400 (no prefix), T = 96·4 = 384  R = 2.4 s, U = 1.92 s    F = 4.32 s   ratio 0.474
    MixGRPO, l = 10   E = 8·10 + 96·(4 + 11) = 1520          R = 1.52 s               F = 3.44 s   ratio 0.377
    Flash*, l = 0     E = 96·8 = 768 (NFE 8)                R = 0.768 s              F = 2.688 s  ratio 0.295
    Flash* async      2 shared cores: F = 2.688 s (ratio 0.295); 2 cores each: max(0.768, 1.92) = 1.92 s (0.211)
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 0.10  # the rule: more than 10 % above the floor is a defect to find


@dataclass(frozen=True)
class UnitCosts:
    eval_s: float  # c_eval: core-seconds of one image model-evaluation in the rollout
    train_s: float  # c_train: core-seconds of one trained sample-step (forward + backward) in the learner

    def __post_init__(self) -> None:
        if not (self.eval_s > 0 and self.train_s > 0):
            raise ValueError(f"unit costs must be > 0, got {self}")


@dataclass(frozen=True)
class Work:
    image_evals: float  # E: rollout image evaluations per iteration
    trained_steps: float  # T: trained sample-steps per iteration
    overlap: bool = False  # async: the rollout of iteration m+1 runs during the update of m

    def __post_init__(self) -> None:
        if self.image_evals < 0 or self.trained_steps < 0:
            raise ValueError(f"counts must be >= 0, got {self}")


def phase_floors(work: Work, costs: UnitCosts, cores: float) -> tuple[float, float]:
    """(R, U): seconds of the rollout and of the update, each alone with every one of `cores` busy."""
    if cores <= 0:
        raise ValueError(f"cores must be > 0, got {cores}")
    return work.image_evals * costs.eval_s / cores, work.trained_steps * costs.train_s / cores


def best_split(work: Work, costs: UnitCosts, cores: float) -> float:
    """C_r: the rollout's share of `cores` that finishes both overlapped phases together."""
    rollout, update = work.image_evals * costs.eval_s, work.trained_steps * costs.train_s
    return cores * rollout / (rollout + update)


def floor_seconds(work: Work, costs: UnitCosts, cores: float, *, rollout_cores: float | None = None,
                  learner_cores: float | None = None) -> float:
    """F, the zero-overhead seconds per iteration (module docstring). Async: the rollout on `rollout_cores` and the
    learner on `learner_cores` (None: the best split of the shared `cores`)."""
    rollout, update = phase_floors(work, costs, cores)
    if not work.overlap:
        return rollout + update
    if rollout_cores is None and learner_cores is None:
        rollout_cores = best_split(work, costs, cores)
        learner_cores = cores - rollout_cores
    if rollout_cores is None or learner_cores is None:
        raise ValueError("give both rollout_cores and learner_cores, or neither (the best split of the cores)")
    times = [rollout * cores / rollout_cores if rollout else 0.0, update * cores / learner_cores if update else 0.0]
    return max(times)


def floor_ratio(work: Work, baseline: Work, costs: UnitCosts, cores: float, **split: float) -> float:
    """F(work) / F(baseline) at the same unit costs and cores (`split`: the async method's core split)."""
    return floor_seconds(work, costs, cores, **split) / floor_seconds(baseline, costs, cores)


def above_floor(measured: float, floor: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a measured time (or ratio) is more than `tolerance` above its floor."""
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    return measured > floor * (1 + tolerance)
