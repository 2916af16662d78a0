"""benchmarks/experiments/replay_screen.py, the self-imitation lever screened for issue 17: the buffer holds the
last perfect images, the term added to a micro-batch's loss is the written-out flow-matching error of the documented
draws, and the patch is undone."""

from __future__ import annotations

import pytest
import torch

from benchmarks.experiments.replay_screen import install, replay_generator
from learner.algo import sigma_schedule
from learner.training import updates
from learner.training.objectives import MatchingSpec
from tests.unit.test_trainer_inprocess import PROMPTS, make_learner, make_worker, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = MatchingSpec(kind="awm", weighting="uniform", times=3, num_steps=8, shift=3.0)


def test_replay_buffers_the_perfect_images_and_adds_their_flow_matching_error():
    batch = make_worker(small_policy(), keep_final=True).rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3])  # 16 rows
    scores = batch.rewards["verifier"]
    threshold = float(scores.sort(descending=True).values[4])  # the 5 best and any tied with the 5th
    best = torch.nonzero(scores >= threshold).flatten().tolist()
    assert len(best) >= 5 and len(best) < 16
    plain_update, plain_micro = updates.Learner.update, updates.Learner._micro_step
    state = install(0.5, capacity=3, rows=2, threshold=threshold, reward="verifier")
    try:
        learner = make_learner(small_policy(), micro_batch_size=8, matching_aux=1.0, aux=SPEC)
        rows, key = torch.arange(8), (0, 0, 1)
        cond = {k: v.repeat_interleave(4, 0) for k, v in batch.cond.items()}
        empty = [learner._micro_step(batch, cond, rows, [0, 1], learner.advantages(batch), key)[0],
                 plain_micro(learner, batch, cond, rows, [0, 1], learner.advantages(batch), key)[0]]
        torch.testing.assert_close(empty[0].detach(), empty[1].detach(), rtol=0, atol=0)  # nothing buffered yet
        learner.update(batch)
        assert state["added"] == len(best) and len(state["buffer"]) == 3  # the capacity keeps the last 3
        for (x0, states), i in zip(state["buffer"], best[-3:], strict=True):
            torch.testing.assert_close(x0, batch.final_latents[i])
            torch.testing.assert_close(states["pooled_projections"], batch.cond["pooled_projections"][i // 4])
        adv = learner.advantages(batch)
        with_replay, m = learner._micro_step(batch, cond, rows, [0, 1], adv, key)
        state["restore"]()
        assert updates.Learner.update is plain_update
        plain, m0 = learner._micro_step(batch, cond, rows, [0, 1], adv, key)
    finally:
        state["restore"]()
    # written out: 2 buffered images drawn by the documented generator, a time from the 8-step grid, fresh ε
    gen = replay_generator(3, key)
    pick = torch.randint(3, (2,), generator=gen).tolist()
    grid = sigma_schedule(8, 3.0)[:-1].float()
    t = grid[torch.randint(len(grid), (2,), generator=gen)]
    x0 = torch.stack([state["buffer"][i][0] for i in pick])
    c = {k: torch.stack([state["buffer"][i][1][k] for i in pick]) for k in cond}
    eps = torch.randn(x0.shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        err = ((learner.policy.velocity(x_t, t, c).float() - (eps - x0)) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(with_replay.detach() - plain.detach(), 0.5 * err, rtol=1e-4, atol=1e-6)
    assert m["forward_rows"] == m0["forward_rows"] + 2
    assert err > 0.01


def test_replay_refuses_a_run_without_the_matching_term_or_the_reward_by_name():
    batch = make_worker(small_policy(), keep_final=True).rollout(0, (0, 2), PROMPTS[:2], [0, 1])
    state = install(0.5, capacity=3, rows=2, threshold=0.5, reward="verifier")
    try:
        with pytest.raises(ValueError, match="grpo.matching_aux"):
            make_learner(small_policy()).update(batch)
        wrong = install(0.5, capacity=3, rows=2, threshold=0.5, reward="shapes_verifier")
        try:
            with pytest.raises(ValueError, match="'shapes_verifier' reward; this run's rewards: \\['verifier'\\]"):
                make_learner(small_policy(), matching_aux=1.0, aux=SPEC).update(batch)
        finally:
            wrong["restore"]()
    finally:
        state["restore"]()
    assert state["added"] == 0
