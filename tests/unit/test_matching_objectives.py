"""The matching objectives in the Learner (learner/training/objectives.py). AWM: its gradient against the written-out
formula, no gradient from groups of equal rewards, one backward per time draw giving the same update. DiffusionNFT:
its first gradient against the independent form, the lagged policy φ updated after each iteration, published to
the workers and checkpointed. The rollout keeps the final latents only when asked; the config refuses what these
objectives cannot run."""

from __future__ import annotations

import pytest
import torch

from learner.algo import Stream, seeded_generator, sigma_schedule
from learner.algo.family import stratified_indices
from learner.driver.build import build_worker
from learner.training.objectives import MatchingSpec
from learner.training.records import RATIO_STATS
from services.config import ConfigError, load_config
from services.types import merge_batches
from tests.unit.test_trainer_inprocess import (
    PROMPTS,
    assert_same_update,
    make_learner,
    make_worker,
    small_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = MatchingSpec(kind="awm", weighting="uniform", times=3, num_steps=8, shift=3.0)


@pytest.fixture(scope="module")
def batch():
    worker = make_worker(small_policy(), keep_final=True)  # 4 prompts × G = 4: 16 rows; 2 SDE steps at the start
    return worker.rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3])


def awm_learner(**kw):
    spec = kw.pop("spec", SPEC)
    return make_learner(small_policy(), objective=spec.kind, matching=spec, **kw)


def test_rollout_keeps_final_latents_only_when_asked(batch):
    assert batch.final_latents.shape == (16, 3, 32, 32) and batch.final_latents.dtype == torch.float32
    plain = make_worker(small_policy()).rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3])
    assert plain.final_latents is None
    torch.testing.assert_close(plain.latents, batch.latents)  # the same sampling either way
    parts = [make_worker(small_policy(), keep_final=True).rollout(0, (0, 2), PROMPTS[2:], [2, 3]),
             make_worker(small_policy(), keep_final=True).rollout(0, (0, 2), PROMPTS[:2], [0, 1])]
    torch.testing.assert_close(merge_batches(parts).final_latents, batch.final_latents)  # merged in group order


def micro_batch_draws(u: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro-batch u's rows (8), its T = 3 stratified times over σ_0…σ_7 and its fresh ε, from the run's seeded
    streams (seed 3, iteration 0, epoch 0), drawn here independently of the learner."""
    grid = sigma_schedule(8, 3.0)[:-1].float()
    t = grid[stratified_indices(8, 3, seeded_generator(3, Stream.AWM_TIMES, 0, 0, u))]
    eps = torch.randn((8, 3, 3, 32, 32), generator=seeded_generator(3, Stream.AWM_NOISE, 0, 0, u))
    return torch.arange(8 * u, 8 * u + 8), t, eps


def written_out_gradient(learner, batch, per_row, adv: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of Σ_rows,draws Ā·per_row(v, x_t, x0, ε, t) / (B·T), written out independently of the learner:
    by default A = (R − mean_group) / (population std of the batch + 1e-4), clipped at ±5, then / 5 (else `adv`,
    (B,)); per micro-batch u of 8 rows, T = 3 stratified times over σ_0…σ_7 and fresh ε from the run's seeded
    streams (seed 3, iteration 0)."""
    if adv is None:
        r = batch.rewards["verifier"].view(4, 4)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(unbiased=False) + 1e-4)).clamp(-5, 5).flatten() / 5
    cond = {k: v.repeat_interleave(4, 0) for k, v in batch.cond.items()}
    total = 0.0
    for u in range(2):
        rows, t, eps = micro_batch_draws(u)
        for j in range(3):
            x0 = batch.final_latents[rows]
            x_t = (1 - t[j]) * x0 + t[j] * eps[:, j]
            v = learner.policy.velocity(x_t, t[j].repeat(8), {k: c[rows] for k, c in cond.items()})
            total = total + (adv[rows] * per_row(v, x_t, x0, eps[:, j], t[j])).sum() / (16 * 3)
    learner.optimizer.zero_grad(set_to_none=True)
    total.backward()
    return torch.cat([p.grad.flatten() for p in learner.params])


def test_uniform_awm_gradient_is_the_written_out_advantage_weighted_flow_matching(batch):
    learner = awm_learner(micro_batch_size=8)
    got = learner.policy_gradient(batch)
    expected = written_out_gradient(learner, batch, lambda v, x_t, x0, eps, t: ((v - (eps - x0)) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert got.abs().max() > 0


def test_grpo_adv_clip_max_bounds_the_matching_advantages(batch):
    """grpo.adv_clip_max was read by the clipped policy loss only: AWM and NFT clipped at 5 whatever it said. Now Ā =
    clip(A, ±c)/c for the learner's c (here 0.5, where most of this batch's advantages are clipped)."""
    import dataclasses

    learner = awm_learner(micro_batch_size=8, adv_clip_max=0.5, spec=dataclasses.replace(SPEC, adv_clip=0.5))
    r = batch.rewards["verifier"].view(4, 4)
    z = ((r - r.mean(1, keepdim=True)) / (r.std(unbiased=False) + 1e-4)).flatten()
    assert (z.abs() > 0.5).sum() >= 4  # the clip matters here
    torch.testing.assert_close(learner.advantages(batch), z.clamp(-0.5, 0.5))
    got = learner.policy_gradient(batch)
    expected = written_out_gradient(learner, batch, lambda v, x_t, x0, eps, t: ((v - (eps - x0)) ** 2).flatten(1).mean(1),
                                    adv=z.clamp(-0.5, 0.5) / 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    cfg = load_config(["awm"], ["grpo.adv_clip_max=0.5"])  # the config reaches the learner's spec
    from learner.driver.build import build_learner

    assert build_learner(cfg).awm.adv_clip == 0.5


def test_groups_of_equal_rewards_give_no_gradient(batch):
    flat = batch.__class__(**{**batch.__dict__, "rewards": {"verifier": torch.full((16,), 0.5)}})
    assert awm_learner(spec=MatchingSpec(weighting="ghuber", times=3, num_steps=8)).policy_gradient(flat).abs().max() == 0


def test_one_backward_per_time_draw_gives_the_same_update(batch):
    spec = MatchingSpec(weighting="ghuber", times=3, num_steps=8)
    whole, split = awm_learner(spec=spec), awm_learner(spec=spec, timesteps_per_backward=1)
    a, b = whole.update(batch), split.update(batch)
    assert a["objective"] == "awm" and a["num_updates"] == 2
    assert not set(RATIO_STATS) & set(a)  # no likelihood ratio: no made-up ratio of 1 and clip fraction of 0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and len(a["trained_steps"]) == 3
    start = dict(enumerate(p.detach().clone() for p in awm_learner(spec=spec).params))
    assert_same_update(start, dict(enumerate(whole.params)), dict(enumerate(split.params)))


def test_mixgrpo_with_the_matching_term_adds_beta_times_the_written_out_awm_gradient(batch):
    """grpo.matching_aux = β: the window's clipped-ratio gradient (a plain GRPO learner's) plus β × AWM's
    advantage-weighted matching gradient written out, with GRPO's own advantages (group mean and unbiased std) in
    AWM's loss (which clips them at ±5 and divides by 5) and AWM's seeded time draws per micro-batch."""
    beta, spec = 0.5, MatchingSpec(kind="awm", weighting="uniform", times=3, num_steps=8, shift=3.0)
    mixed = make_learner(small_policy(), micro_batch_size=8, matching_aux=beta, aux=spec)
    grpo = make_learner(small_policy(), micro_batch_size=8).policy_gradient(batch)
    r = batch.rewards["verifier"].view(4, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).clamp(-5, 5).flatten() / 5
    awm = written_out_gradient(mixed, batch, lambda v, x_t, x0, eps, t: ((v - (eps - x0)) ** 2).flatten(1).mean(1),
                               adv=adv)
    mixed.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(mixed.policy_gradient(batch), grpo + beta * awm, rtol=1e-4, atol=1e-7)
    assert awm.abs().max() > 10 * (grpo.abs().max() * 1e-4)  # the term is not negligible next to the ratio's
    cfg = load_config(["mixgrpo"], ["grpo.matching_aux=1"])
    assert cfg.grpo.matching_aux == 1 and build_worker(cfg, None).keep_final  # the workers keep the final latents
    with pytest.raises(ValueError, match="matching_aux"):
        make_learner(small_policy(), matching_aux=0.5)  # no spec


def test_the_matching_term_counts_its_forward_rows(batch):
    """forward_rows with grpo.matching_aux: the window's rows (16 × 2, each micro-batch one group of 4 sharing its
    first step: 32 − 4 × 3 = 20) plus the term's 16 rows × 3 time draws."""
    spec = MatchingSpec(kind="awm", weighting="uniform", times=3, num_steps=8, shift=3.0)
    stats = make_learner(small_policy(), matching_aux=0.5, aux=spec, update_order="by_group").update(batch)
    assert stats["trained_sample_steps"] == 32 and stats["forward_rows"] == 20 + 16 * 3


def test_an_awm_batch_without_final_latents_is_refused():
    plain = make_worker(small_policy()).rollout(0, (0, 2), PROMPTS, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="final latents"):
        awm_learner().update(plain)


@pytest.mark.parametrize("overrides,needle", [
    (["grpo.objective=awm", "grpo.matching_times=40"], "grpo.matching_times"),
    (["run.method=diffusion_nft"], "grpo.objective=nft"),
    (["grpo.objective=nft", "learner.num_workers=2", "learner.gradient_accumulation_steps=2", "learner.sharding=fsdp",
      "model.lora_rank=0"], "learner.sharding=none"),
    (["grpo.objective=awm", "grpo.train_fraction=0.5"], "grpo.train_fraction"),
    (["run.method=awm"], "grpo.objective=awm"),
    (["grpo.awm_weighting=huber"], "grpo.awm_weighting"),
    (["grpo.awm_lagged_beta=1"], "grpo.objective=awm"),
    (["grpo.objective=nft", "grpo.awm_lagged_beta=1"], "grpo.objective=awm, not nft"),
    (["grpo.objective=awm", "grpo.matching_aux=1"], "grpo.matching_aux"),
    (["grpo.matching_aux=1", "sampler.num_steps=4", "window.size=2"], "grpo.matching_times"),
    (["run.method=tempflow_grpo", "sampler.branching=tempflow", "grpo.matching_aux=1", "window.strategy=frozen"],
     "grpo.matching_aux"),
])
def test_config_refuses_what_awm_cannot_run(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value)


def test_awm_preset():
    cfg = load_config(["awm"], [])
    assert (cfg.run.method, cfg.grpo.objective, cfg.grpo.awm_weighting, cfg.grpo.matching_times) == (
        "awm", "awm", "ghuber", 6)
    assert (cfg.window.strategy, cfg.window.start, cfg.window.size) == ("frozen", 0, 2)
    assert (cfg.grpo.kl_beta, cfg.grpo.awm_lagged_beta) == (0.001, 1.0)  # the reference's GenEval β and ema_beta
    nft = load_config(["diffusion_nft"], [])
    assert (nft.grpo.objective, nft.grpo.nft_beta, nft.grpo.nft_decay_cap, nft.sampler.post_window) == (
        "nft", 1.0, 0.5, "dpm")
    assert nft.grpo.kl_beta == 1e-4  # METHODS.md §4: β_KL = 1e-4 (SD3.5-M)


# ------------------------------------------------------------------------------------------------ DiffusionNFT
NFT = MatchingSpec(kind="nft", times=3, num_steps=8, beta=0.5)


def test_nft_first_gradient_is_the_advantage_weighted_normalised_error(batch):
    """At the first update θ = φ, so ∂ℓ/∂v = (2r − 1)·∇L_norm = clip(A)/5 · ∇L_norm for any β (METHODS.md §4)."""
    learner = awm_learner(spec=NFT, micro_batch_size=8)
    got = learner.policy_gradient(batch)

    def normalised_x0_error(v, x_t, x0, eps, t):
        diff = (x_t - t * v - x0).flatten(1)
        return diff.pow(2).mean(1) / diff.abs().mean(1).clamp(min=1e-5).detach()

    expected = written_out_gradient(learner, batch, normalised_x0_error)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_nft_lagged_policy_is_updated_published_and_checkpointed(batch, tmp_path):
    from learner.training import load_checkpoint

    learner = awm_learner(spec=NFT)
    phi0 = {k: v.clone() for k, v in learner.lagged.items()}
    torch.testing.assert_close(phi0, {k: v.clone() for k, v in learner.policy.trainable_state_dict().items()})
    learner.update(batch)
    theta = learner.policy.trainable_state_dict()
    d = min(0.001 * 1, 0.5)  # after iteration 1
    for k, v in learner.lagged.items():
        torch.testing.assert_close(v, d * phi0[k] + (1 - d) * theta[k])
    assert any(not torch.equal(learner.lagged[k], theta[k]) for k in theta)  # φ lags θ
    packet = learner.get_weights()
    for k, v in learner.lagged.items():  # the workers sample with φ
        assert torch.equal(packet.state[k], v)
    path = learner.save(str(tmp_path))
    _, optim, _ = load_checkpoint(path)
    assert set(optim["lagged"]) == set(theta)
    again = awm_learner(spec=NFT)
    again.restore(path)
    for k, v in learner.lagged.items():
        assert torch.equal(again.lagged[k], v)
    with pytest.raises(ValueError, match="lagged policy"):
        awm_learner().restore(path)  # an AWM learner has no lagged policy to restore it into


def test_nft_evaluation_scores_theta_on_workers_that_sample_with_phi(batch):
    """The workers hold φ (they sample with it); the held-out evaluation scores θ, the weights the run checkpoints
    and exports, as the reference evaluates: the worker holds θ's packet for the evaluation only, verified both
    ways, and a packet that fails its checksum leaves the worker's own φ in place."""
    from services.broadcast import WeightPacket, WeightSyncError

    learner = awm_learner(spec=NFT)
    learner.update(batch)
    assert awm_learner().evaluated_weights() is None  # AWM (as GRPO): the workers hold θ already
    theta, phi = learner.evaluated_weights(), learner.get_weights()
    assert theta.version == phi.version == 1 and any(not torch.equal(theta.state[k], phi.state[k]) for k in phi.state)
    for k, v in learner.policy.trainable_state_dict().items():
        assert torch.equal(theta.state[k], v)
    worker = make_worker(small_policy())
    worker.sync_weights(phi)
    with worker.holding(theta):
        assert all(torch.equal(v, theta.state[k]) for k, v in worker.policy.trainable_state_dict().items())
    assert all(torch.equal(v, phi.state[k]) for k, v in worker.policy.trainable_state_dict().items())
    bad = WeightPacket(theta.version, "b2:" + "0" * 32, theta.state)
    with pytest.raises(WeightSyncError), worker.holding(bad):
        pass
    assert all(torch.equal(v, phi.state[k]) for k, v in worker.policy.trainable_state_dict().items())
    assert worker.version == 1


# ------------------------------------------------------------------------------------------------ AWM's lagged copy
def test_awm_lagged_copy_regularises_checkpoints_and_is_not_published(batch, tmp_path):
    """AWM with lagged_beta: φ ← d·φ + (1−d)·θ after each iteration (d = min(0.001·m, 0.3)); the gradient gains
    β·∇ mean (v_θ − v_φ)² on the same re-noised draws (φ's velocity from a second policy holding φ); the workers
    still get θ; φ checkpoints and restores."""
    from learner.training import load_checkpoint

    beta = 0.5
    spec = MatchingSpec(weighting="uniform", times=3, num_steps=8, shift=3.0, decay_cap=0.3, lagged_beta=beta)
    learner = awm_learner(spec=spec, micro_batch_size=8)
    learner.update(batch)
    theta = learner.policy.trainable_state_dict()
    assert any(not torch.equal(learner.lagged[k], theta[k]) for k in theta)
    assert all(torch.equal(learner.get_weights().state[k], theta[k]) for k in theta)  # workers sample with θ
    got = learner.policy_gradient(batch)
    plain = MatchingSpec(weighting="uniform", times=3, num_steps=8, shift=3.0)
    learner.awm = plain  # the same θ without the regulariser
    without = learner.policy_gradient(batch)
    learner.awm = spec
    phi = small_policy()
    phi.load_trainable_state_dict(learner.lagged)
    cond = {k: v.repeat_interleave(4, 0) for k, v in batch.cond.items()}
    reg = 0.0
    for u in range(2):
        rows, t, eps = micro_batch_draws(u)
        c = {k: v[rows] for k, v in cond.items()}
        for j in range(3):
            x_t = (1 - t[j]) * batch.final_latents[rows] + t[j] * eps[:, j]
            with torch.no_grad():
                v_phi = phi.velocity(x_t, t[j].repeat(8), c)
            v = learner.policy.velocity(x_t, t[j].repeat(8), c)
            reg = reg + beta * (v - v_phi).pow(2).flatten(1).mean(1).sum() / (16 * 3)
    learner.optimizer.zero_grad(set_to_none=True)
    reg.backward()
    expected = without + torch.cat([p.grad.flatten() for p in learner.params])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert (got - without).abs().max() > 0
    path = learner.save(str(tmp_path))
    assert set(load_checkpoint(path)[1]["lagged"]) == set(theta)
    again = awm_learner(spec=spec)
    again.restore(path)
    assert all(torch.equal(again.lagged[k], v) for k, v in learner.lagged.items())
