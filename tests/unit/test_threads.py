"""Elastic learner threads in async mode (learner/training/threads.py): raised once the overlapping rollout is
done, for the rest of the update only, and the update's numbers do not depend on them beyond float tolerance."""

import pytest
import torch

from learner.training.threads import ThreadBoost

from .test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_threads_rise_once_the_overlapping_work_is_done_and_come_back(one_thread):
    answers = iter([False, False, True])  # done() is not asked again once it said yes
    boost = ThreadBoost(lambda: next(answers), extra=1)
    seen = []
    for _ in range(5):
        boost()
        seen.append(torch.get_num_threads())
    assert seen == [1, 1, 2, 2, 2]
    assert boost.stats() == {"overlap_boost_at": 2, "overlap_boost_frac": 3 / 5}
    boost.restore()
    assert torch.get_num_threads() == 1


def test_no_extra_threads_never_asks_and_bad_counts_are_refused(one_thread):
    def never_asked():
        raise AssertionError("done() asked with extra=0")

    boost = ThreadBoost(never_asked, extra=0)
    for _ in range(3):
        boost()
    assert torch.get_num_threads() == 1 and boost.stats() == {"overlap_boost_at": -1, "overlap_boost_frac": 0.0}
    with pytest.raises(ValueError, match="extra threads"):
        ThreadBoost(lambda: True, extra=-1)


def test_update_asks_before_every_micro_batch_and_its_numbers_do_not_depend_on_the_threads(one_thread):
    worker = make_worker(small_policy())
    batch = worker.rollout(0, (1, 4), PROMPTS, [0, 1, 2, 3])  # 16 rows, micro-batches of 4
    plain, boosted = make_learner(small_policy()), make_learner(small_policy())
    ref = plain.update(batch)
    threads = []
    answers = iter([False, True])

    def done():
        return next(answers)

    boost = ThreadBoost(done, extra=1)

    def between():
        boost()
        threads.append(torch.get_num_threads())

    got = boosted.update(batch, between=between)
    boost.restore()
    assert threads == [1, 2, 2, 2] and torch.get_num_threads() == 1  # micro-batches 1–3 with two threads
    for k in ("loss", "grad_norm", "ratio_mean", "approx_kl"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    a, b = plain.policy.trainable_state_dict(), boosted.policy.trainable_state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
