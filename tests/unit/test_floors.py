"""`benchmarks/floors.py` on its docstring's worked example: the paper's shape, 2 cores, c_eval 2 ms, c_train 10 ms."""

from __future__ import annotations

import pytest

from benchmarks.floors import (
    UnitCosts,
    Work,
    above_floor,
    best_split,
    floor_ratio,
    floor_seconds,
    phase_floors,
)

COSTS = UnitCosts(eval_s=0.002, train_s=0.010)
DANCE = Work(image_evals=96 * 25, trained_steps=96 * 14)
MIX_0 = Work(image_evals=96 * 25, trained_steps=96 * 4)  # window at 0: no shared prefix
MIX_10 = Work(image_evals=8 * 10 + 96 * (4 + 11), trained_steps=96 * 4)  # prefix of 10 once per group, 4 + 11 after
FLASH_STAR = Work(image_evals=96 * 8, trained_steps=96 * 4)


def test_sync_floors_are_the_phases_one_after_the_other():
    assert phase_floors(DANCE, COSTS, 2) == pytest.approx((2.4, 6.72))
    assert floor_seconds(DANCE, COSTS, 2) == pytest.approx(9.12)
    assert floor_seconds(MIX_0, COSTS, 2) == pytest.approx(4.32)
    assert floor_seconds(MIX_10, COSTS, 2) == pytest.approx(3.44)
    assert floor_seconds(FLASH_STAR, COSTS, 2) == pytest.approx(2.688)
    assert floor_seconds(DANCE, COSTS, 4) == pytest.approx(9.12 / 2)  # twice the cores, half the floor


def test_floor_ratios_against_dance_grpo():
    assert floor_ratio(DANCE, DANCE, COSTS, 2) == 1.0
    assert floor_ratio(MIX_0, DANCE, COSTS, 2) == pytest.approx(4.32 / 9.12)  # 0.474
    assert floor_ratio(MIX_10, DANCE, COSTS, 2) == pytest.approx(3.44 / 9.12)  # 0.377
    assert floor_ratio(FLASH_STAR, DANCE, COSTS, 2) == pytest.approx(2.688 / 9.12)  # 0.295
    assert floor_ratio(MIX_0, DANCE, UnitCosts(0.004, 0.020), 2) == pytest.approx(4.32 / 9.12)  # scale-free


def test_async_floor_is_the_max_of_the_phases_on_their_own_cores():
    flash_async = Work(FLASH_STAR.image_evals, FLASH_STAR.trained_steps, overlap=True)
    # separate devices, 2 cores each: max(R = 0.768, U = 1.92)
    assert floor_seconds(flash_async, COSTS, 2, rollout_cores=2, learner_cores=2) == pytest.approx(1.92)
    assert floor_ratio(flash_async, DANCE, COSTS, 2, rollout_cores=2, learner_cores=2) == pytest.approx(1.92 / 9.12)
    # the 2 shared cores split 1 + 1: max(1.536, 3.84) = 3.84, worse than sync
    assert floor_seconds(flash_async, COSTS, 2, rollout_cores=1, learner_cores=1) == pytest.approx(3.84)
    # the best split, 2·1.536 / 5.376 = 0.571 cores to the rollout, ends both together: the sync floor again
    assert best_split(flash_async, COSTS, 2) == pytest.approx(2 * 1.536 / 5.376)
    assert floor_seconds(flash_async, COSTS, 2) == pytest.approx(floor_seconds(FLASH_STAR, COSTS, 2)) == 2.688
    with pytest.raises(ValueError, match="both"):
        floor_seconds(flash_async, COSTS, 2, rollout_cores=1)


def test_more_than_ten_percent_above_the_floor_is_flagged():
    assert not above_floor(9.12 * 1.10, 9.12)  # exactly 10 % above: not flagged
    assert above_floor(9.12 * 1.11, 9.12)
    assert not above_floor(0.50, 0.474) and above_floor(0.53, 0.474)  # ratios: 5.5 % and 11.8 % above
    assert above_floor(0.50, 0.474, tolerance=0.05)
    with pytest.raises(ValueError, match="floor"):
        above_floor(1.0, 0.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unit costs"):
        UnitCosts(0.0, 0.01)
    with pytest.raises(ValueError, match="counts"):
        Work(-1, 10)
    with pytest.raises(ValueError, match="cores"):
        phase_floors(DANCE, COSTS, 0)


@pytest.mark.parametrize("c_eval, c_train", [(0.001, 0.1), (0.002, 0.010), (0.006, 0.018), (0.1, 0.001)])
def test_a_sync_floor_ratio_lies_between_the_work_ratios(c_eval, c_train):
    """The docstring's bound at the paper's shape with the shared first window step: Flash* (E 680, T 300) against
    DanceGRPO (E 2312, T 1300) stays in [0.231, 0.294] whatever the unit costs."""
    dance, flash_star = Work(2312, 1300), Work(680, 300)
    ratio = floor_ratio(flash_star, dance, UnitCosts(c_eval, c_train), 2)
    assert 300 / 1300 <= ratio <= 680 / 2312
    assert 300 / 1300 == pytest.approx(0.231, abs=5e-4) and 680 / 2312 == pytest.approx(0.294, abs=5e-4)
