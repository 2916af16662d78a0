"""Update semantics like the references: an optimizer step covers micro_batch × accumulation samples, its grad-norm
clip sees that whole gradient, an iteration takes batch / (micro_batch × accumulation) steps, and splitting the
window into one backward per timestep (MixGRPO's and DanceGRPO's way) gives the same gradient."""

from __future__ import annotations

import pytest
import torch

from learner.algo import Stream, seeded_generator
from tests.unit.test_trainer_inprocess import (
    PROMPTS,
    assert_same_update,
    make_learner,
    make_worker,
    small_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    worker = make_worker(small_policy())  # 4 prompts × G = 4: 16 rows, window of 3 steps
    return worker.rollout(0, (1, 3), PROMPTS, [0, 1, 2, 3])


def test_steps_per_iteration_and_the_clip_sees_the_whole_accumulated_gradient(batch):
    norms = learner_step_norms(small_policy(), batch)  # micro-batch 2 × accumulation 4 = 8 samples per step
    assert len(norms) == 16 // (2 * 4)
    # independently: the gradient of the mean loss over the first 8 rows of the update's order, in one backward
    reference = make_learner(small_policy(), micro_batch_size=8, gradient_accumulation_steps=1)
    order = torch.randperm(16, generator=seeded_generator(3, Stream.UPDATE_ORDER, 0, 0))
    cond = {k: v.repeat_interleave(batch.group_size, 0) for k, v in batch.cond.items()}
    loss, _ = reference._micro_step(batch, cond, order[:8], [0, 1, 2], reference.advantages(batch))
    loss.backward()
    expected = torch.sqrt(sum((p.grad ** 2).sum() for p in reference.params))
    assert norms[0] == pytest.approx(float(expected), rel=1e-4)


def learner_step_norms(policy, batch) -> list[float]:
    """Every optimizer step's pre-clip gradient norm of an update with 2 × 4 samples per step."""
    learner = make_learner(policy, micro_batch_size=2, gradient_accumulation_steps=4, grad_clip=1e9)
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        norms.append(float(original(params, max_norm)))
        return torch.tensor(norms[-1])

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        learner.update(batch)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    return norms


def test_one_backward_per_timestep_gives_the_same_update(batch):
    whole, split = small_policy(), small_policy()
    a = make_learner(whole).update(batch)
    b = make_learner(split, timesteps_per_backward=1).update(batch)
    # (a batch of 8 rows in a forward instead of 24 changes the last bits of the velocity; the loss is a mean of
    # ±A·ρ terms of order 1 that nearly cancel, so it is compared in absolute terms)
    for k in ("loss", "ratio_mean", "ratio_min", "ratio_max", "approx_kl"):
        assert b[k] == pytest.approx(a[k], abs=1e-7), k
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["loss_per_step"] == pytest.approx(a["loss_per_step"], abs=1e-7)
    assert_same_update(small_policy().trainable_state_dict(), whole.trainable_state_dict(), split.trainable_state_dict())
    c = make_learner(small_policy(), timesteps_per_backward=2).update(batch)  # chunks of 2 and 1
    assert c["loss"] == pytest.approx(a["loss"], abs=1e-7) and c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_the_optimizer_is_fused_adamw_with_the_default_implementations_step():
    """`adamw` builds torch's fused AdamW on the CPU; its steps are the per-tensor implementation's, to rounding."""
    from learner.training.group import adamw

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    kwargs = {"lr": 1e-2, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
    fused, plain = adamw(list(a.parameters()), kwargs), torch.optim.AdamW(list(b.parameters()), **kwargs)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    plain.load_state_dict(fused.state_dict())  # checkpoints move between the two
