"""Window tables for every strategy."""

import math

import pytest

from learner.algo import Window, window_at

N, W = 25, 4  # reference: last start is N − 1 − w = 20


def starts(strategy, iters, **kw):
    args = dict(num_steps=N, size=W, shift_interval=25, stride=1, strategy=strategy) | kw
    return [window_at(m, **args).start for m in iters]


def test_progressive_reference_table():
    # l = min(s·⌊m/τ⌋, N−1−w) with τ = 25, s = 1
    assert starts("progressive", [0, 24, 25, 49, 50, 299, 500, 525, 10_000]) == [0, 0, 1, 1, 2, 11, 20, 20, 20]


def test_progressive_stride_and_clamp():
    assert starts("progressive", [0, 1, 2, 3, 10], shift_interval=1, stride=3) == [0, 3, 6, 9, 20]


def test_frozen_stays_and_stride_zero_freezes_progressive():
    assert starts("frozen", [0, 100, 10_000], start=5) == [5, 5, 5]
    assert starts("progressive", [0, 100, 10_000], stride=0) == [0, 0, 0]


def test_random_is_deterministic_per_seed_and_iteration_and_in_range():
    a = starts("random", range(200), seed=7)
    assert a == starts("random", range(200), seed=7)
    assert a != starts("random", range(200), seed=8)
    assert min(a) == 0 and max(a) == N - 1 - W  # covers the whole range over 200 draws
    assert len(set(a)) > 10


def test_linear_decay_intervals_shrink():
    kw = dict(shift_interval=10, shift_interval_min=2)
    seq = starts("linear_decay", range(400), **kw)
    stays = [seq.count(pos) for pos in range(N - 1 - W)]
    # τ(l) = round(10 − 8·l/20): 10 at l=0, 2 at the end
    assert stays == [max(1, round(10 - 8 * pos / 20)) for pos in range(N - 1 - W)]
    assert seq[-1] == 20 and stays[0] == 10 and stays[-1] == 2


def test_exp_decay_table():
    seq = starts("exp_decay", range(1000), shift_interval=25, decay_rate=0.1, decay_threshold=13)
    stays = [seq.count(pos) for pos in range(N - 1 - W)]
    assert stays == [math.ceil(25 * math.exp(-0.1 * max(0, pos - 13))) for pos in range(N - 1 - W)]
    assert stays[:14] == [25] * 14 and stays[14] == math.ceil(25 * math.exp(-0.1))


def test_window_properties_and_validation():
    w = window_at(60, num_steps=N, size=W, shift_interval=25, stride=1)
    assert w == Window(2, 4) and list(w.steps) == [2, 3, 4, 5] and w.last == 5 and w.stop == 6
    with pytest.raises(ValueError, match="window size"):
        window_at(0, num_steps=5, size=5, shift_interval=1, stride=1)
    with pytest.raises(ValueError, match="window start"):
        window_at(0, num_steps=N, size=W, shift_interval=1, stride=1, strategy="frozen", start=21)
    with pytest.raises(ValueError, match="unknown window strategy"):
        window_at(0, num_steps=N, size=W, shift_interval=1, stride=1, strategy="spiral")
