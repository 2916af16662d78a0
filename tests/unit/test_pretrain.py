"""Flow-matching pre-training, the pre-training command line, and the shipped tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.tools import pretrain
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy
from services import shapes_world

SHIPPED = Path(__file__).resolve().parents[2] / "rollout_workers" / "assets" / "tiny_policy"


def small_policy(seed: int = 0) -> TinyPolicy:
    config = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                         text_hidden_size=32, text_layers=1, text_intermediate_size=64)
    return TinyPolicy.from_config(config, seed=seed)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- flow-matching math


def test_flow_matching_pair_hand_computed():
    # Two samples of one channel, 1x2 pixels. x_σ = (1 − σ)·x0 + σ·ε and v = ε − x0:
    #   σ = 0.25: x0 = (0.5, −1), ε = (2, 0)  -> x_σ = (0.375 + 0.5, −0.75 + 0) = (0.875, −0.75), v = (1.5, 1)
    #   σ = 1:    x0 = (1, 1),    ε = (−0.5, 3) -> x_σ = ε = (−0.5, 3),                     v = (−1.5, 2)
    x0 = torch.tensor([[[[0.5, -1.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2)
    noise = torch.tensor([[[[2.0, 0.0]]], [[[-0.5, 3.0]]]])
    sigma = torch.tensor([0.25, 1.0])
    x_sigma, target = pretrain.flow_matching_pair(x0, noise, sigma)
    assert torch.allclose(x_sigma, torch.tensor([[[[0.875, -0.75]]], [[[-0.5, 3.0]]]]))
    assert torch.allclose(target, torch.tensor([[[[1.5, 1.0]]], [[[-1.5, 2.0]]]]))
    # The ALGORITHM.md identities with the exact velocity: x̂0 = x − σ·v, ε̂ = x + (1 − σ)·v.
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(x_sigma - s * target, x0) and torch.allclose(x_sigma + (1 - s) * target, noise)


def test_images_to_tensor_inverts_decode():
    images = shapes_world.render("a red circle left of a blue square", np.random.default_rng(0))[None]
    x0 = pretrain.images_to_tensor(images)  # (1, 3, 32, 32)
    assert x0.shape == (1, 3, 32, 32) and x0.min() == -1.0 and x0.max() == 1.0
    assert np.array_equal(small_policy().decode(x0), images)


def test_sigma_sampling_and_lr_schedule():
    sigma = pretrain.sample_sigma(10_000, torch.Generator().manual_seed(0))  # shift 3: median 1.5 / 2
    assert ((sigma >= 0) & (sigma <= 1)).all() and abs(float(sigma.median()) - 0.75) < 0.02
    assert torch.equal(pretrain.sample_sigma(3, torch.Generator().manual_seed(1), shift=1.0),
                       torch.rand(3, generator=torch.Generator().manual_seed(1)))
    lr = [pretrain.warmup_cosine(s, warmup=10, total=110) for s in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.5) and lr[110] == pytest.approx(0.0, abs=1e-12)


def test_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    policy = small_policy()
    fixed = pretrain.make_batch(policy, 16, np.random.default_rng(123), torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = float(pretrain.flow_matching_loss(policy, *fixed))
    result = pretrain.pretrain_policy(policy, steps=25, batch_size=16, seed=0, lr=3e-3, warmup=5,
                                      log_every=25, log=lambda s: None)
    with torch.no_grad():
        after = float(pretrain.flow_matching_loss(policy, *fixed))
    assert result["steps"] == 25 and not result["stopped_early"]
    assert after < 0.75 * before, (before, after)


def test_prompt_dropout_replaces_prompts_with_the_empty_one():
    """p_uncond: the same renders, noise and σ as without it; a prompt's cond is the empty prompt's where it
    was dropped, its own elsewhere, and about p_uncond of them are dropped."""
    policy = small_policy()
    args = lambda: (np.random.default_rng(5), torch.Generator().manual_seed(5))  # noqa: E731
    x0, noise, sigma, cond = pretrain.make_batch(policy, 400, *args())
    x0d, noised, sigmad, condd = pretrain.make_batch(policy, 400, *args(), p_uncond=0.25)
    assert torch.equal(x0, x0d) and torch.equal(noise, noised) and torch.equal(sigma, sigmad)
    empty = policy.encode_prompts([""])["pooled_projections"][0]
    dropped = torch.all(condd["pooled_projections"] == empty, dim=1)  # (400,)
    kept = ~dropped
    assert 0.18 < float(dropped.float().mean()) < 0.32
    assert torch.equal(condd["pooled_projections"][kept], cond["pooled_projections"][kept])
    with pytest.raises(ValueError, match="p_uncond"):
        pretrain.pretrain_policy(policy, steps=1, p_uncond=1.0, log=lambda s: None)


def test_a_sigma_band_draws_uniform_sigmas_in_it_trains_only_there_and_keeps_the_fixed_batch():
    """--sigma-band lo hi: σ = lo + (hi − lo)·u from the same draws u the shifted density uses; the batches' renders
    and noise are unchanged; the loop's fixed batch keeps the default σ; a band outside [0, 1] is refused."""
    u = torch.rand(5, generator=torch.Generator().manual_seed(2))
    band = pretrain.sample_sigma(5, torch.Generator().manual_seed(2), band=(0.7, 1.0))
    torch.testing.assert_close(band, 0.7 + 0.3 * u)
    policy = small_policy()
    args = lambda: (np.random.default_rng(5), torch.Generator().manual_seed(5))  # noqa: E731
    x0, noise, sigma, _ = pretrain.make_batch(policy, 64, *args())
    x0b, noiseb, sigmab, _ = pretrain.make_batch(policy, 64, *args(), sigma_band=(0.7, 1.0))
    assert torch.equal(x0, x0b) and torch.equal(noise, noiseb)
    assert float(sigmab.min()) >= 0.7 and float(sigma.min()) < 0.7
    seen = []
    real = pretrain.flow_matching_loss

    def spy(policy, x0, noise, sigma, cond):
        seen.append(sigma.clone())
        return real(policy, x0, noise, sigma, cond)

    pretrain.flow_matching_loss = spy
    try:
        pretrain.pretrain_policy(small_policy(), steps=2, batch_size=8, seed=1, log_every=2, sigma_band=(0.7, 1.0),
                                 log=lambda s: None)
    finally:
        pretrain.flow_matching_loss = real
    assert len(seen) == 3  # two training steps, then the fixed batch's loss at the log
    assert all(float(s.min()) >= 0.7 for s in seen[:2])
    fixed_sigma = pretrain.make_batch(policy, 8, np.random.default_rng(2), torch.Generator().manual_seed(2))[2]
    torch.testing.assert_close(seen[2], fixed_sigma)  # seed + 1: the default density, as without a band
    for bad in ((0.9, 0.7), (0.5, 1.5), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="sigma band"):
            pretrain.pretrain_policy(small_policy(), steps=1, sigma_band=bad, log=lambda s: None)
    with pytest.raises(SystemExit, match="--sigma-band"):
        pretrain.main(["policy", "--out", "/nonexistent", "--steps", "1", "--sigma-band", "0.9", "0.7"])


def test_pretraining_is_deterministic_given_the_seed():
    runs = []
    for p_uncond in (0.0, 0.0, 0.5):
        policy = small_policy()
        pretrain.pretrain_policy(policy, steps=2, batch_size=4, seed=7, log_every=1, log=lambda s: None,
                                 p_uncond=p_uncond)
        runs.append(policy.trainable_state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # prompt dropout reaches the batches


def test_shipped_checkpoint_files(shipped):
    assert {p.name for p in SHIPPED.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert (SHIPPED / "model.safetensors").stat().st_size < 20 * 2**20
    assert shipped.config == TinyConfig.for_shapes_world()  # the backend's default architecture


# ---------------------------------------------------------------------- command line


def test_eval_command_writes_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = pretrain.main(["eval", "--policy", str(SHIPPED), "--num-steps", "3", "--prompts-per-category", "1",
                        "--splits", "heldout", "--json", str(out), "--threads", str(torch.get_num_threads())])
    assert rc == 0 and "| heldout | **overall** | 4 |" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["heldout"]["per_category"]) == set(shapes_world.CATEGORIES)


def test_reward_command_dispatches_to_train_reward_model(monkeypatch, tmp_path):
    from reward_servers.scorers import shapes_reward_model

    calls = []
    monkeypatch.setattr(shapes_reward_model, "train_reward_model",
                        lambda out_dir, **kw: calls.append((out_dir, kw)) or {"loss": 0.1})
    threads = torch.get_num_threads()
    assert pretrain.main(["reward", "--out", str(tmp_path), "--steps", "3", "--seed", "5",
                          "--threads", str(threads), "--policy-samples", "0"]) == 0
    assert calls == [(str(tmp_path), {"steps": 3, "seed": 5, "num_threads": threads, "extra": None,
                                      "extra_eval": None})]


def test_policy_samples_are_labelled_by_the_verifier():
    from services import shapes_world as sw
    from tests.unit.test_trainer_inprocess import small_policy

    data = pretrain.policy_samples(small_policy(), 8, split="heldout", seed=0, num_steps=4, batch_size=4)
    assert data["images"].shape == (8, 32, 32, 3) and data["images"].dtype == np.uint8
    assert all(sw.is_heldout(p) for p in data["prompts"])
    expected = [sw.verify(p, im).score for p, im in zip(data["prompts"], data["images"])]
    np.testing.assert_allclose(data["targets"], expected)


def test_policy_command_continues_from_init(tmp_path, capsys):
    """--init loads the saved architecture and weights; at lr 0 the saved result is those weights exactly."""
    start = small_policy(seed=3)
    start.save(tmp_path / "start")
    threads = str(torch.get_num_threads())
    assert pretrain.main(["policy", "--init", str(tmp_path / "start"), "--out", str(tmp_path / "out"), "--steps", "2",
                          "--batch-size", "2", "--lr", "0", "--warmup", "1", "--log-every", "1",
                          "--threads", threads]) == 0
    assert f"starting from {tmp_path / 'start'}" in capsys.readouterr().out
    out = TinyPolicy.load(tmp_path / "out")
    assert out.config == start.config  # not the default architecture
    before, after = start.trainable_state_dict(), out.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert record["init"] == str(tmp_path / "start") and record["steps"] == 2
    assert pretrain.main(["policy", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--steps", "1",
                          "--threads", threads]) == 2  # one line, before any model loads
    assert "--init" in capsys.readouterr().err


def test_policy_command_builds_the_architecture_asked_for(tmp_path, capsys):
    """--patch-size & co. size a fresh model (saved in its config.json, loaded back the same); with --init or
    an impossible size the command refuses by name before training."""
    threads = str(torch.get_num_threads())
    assert pretrain.main(["policy", "--out", str(tmp_path / "p2"), "--steps", "1", "--batch-size", "2",
                          "--patch-size", "2", "--num-layers", "1", "--attention-head-dim", "8",
                          "--warmup", "1", "--threads", threads]) == 0
    assert "architecture: patch 2, 1 layers, width 32" in capsys.readouterr().out
    out = TinyPolicy.load(tmp_path / "p2")
    assert (out.config.patch_size, out.config.num_layers, out.config.attention_head_dim) == (2, 1, 8)
    assert out.transformer.config.patch_size == 2 and len(out.transformer.transformer_blocks) == 1
    record = json.loads((tmp_path / "p2" / "pretrain.json").read_text())
    assert record["patch_size"] == 2 and record["num_attention_heads"] is None
    small_policy().save(tmp_path / "start")
    with pytest.raises(SystemExit, match="--init continues the saved architecture; drop --patch-size"):
        pretrain.main(["policy", "--init", str(tmp_path / "start"), "--out", str(tmp_path / "x"),
                       "--steps", "1", "--patch-size", "2", "--threads", threads])
    with pytest.raises(SystemExit, match="bad architecture: sample_size must be a multiple of patch_size"):
        pretrain.main(["policy", "--out", str(tmp_path / "x"), "--steps", "1", "--patch-size", "5",
                       "--threads", threads])
