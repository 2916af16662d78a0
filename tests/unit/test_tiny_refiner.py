"""The tiny policy's pixel-scale refiner: absent it is the plain SD3 transformer; grown on a trained model it starts
at zero output; it is local (7x7 pixels), trains, saves and loads, and `pretrain policy --init` can grow it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel

from learner.tools import pretrain
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy
from rollout_workers.policies.tiny_refiner import RefinedTransformer, build_refiner

VOCAB = ("a", "one", "two", "red", "blue", "circle", "circles", "square", "left", "of")
SD3 = dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=1, num_attention_heads=2,
           attention_head_dim=8, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
           pos_embed_max_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_policy(seed: int = 0) -> TinyPolicy:
    config = TinyConfig.for_shapes_world(num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                         text_hidden_size=16, text_layers=1, text_intermediate_size=32,
                                         refiner_channels=0)
    return TinyPolicy.from_config(config, seed=seed)


def call(model, x, t, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context, pooled = torch.randn(len(x), 5, 16, generator=g), torch.randn(len(x), 16, generator=g)
    return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                 return_dict=False)[0]


def test_without_refiner_it_is_the_sd3_transformer():
    """refiner_channels = 0: the parent's state dict keys and, from the same seed, its outputs bit for bit."""
    torch.manual_seed(0)
    plain = SD3Transformer2DModel(**SD3)
    torch.manual_seed(0)
    same = RefinedTransformer(refiner_channels=0, **SD3)
    assert same.refiner is None and list(same.state_dict()) == list(plain.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([700.0, 30.0])
    assert torch.equal(call(same, x, t), call(plain, x, t))
    with pytest.raises(ValueError, match="refiner_channels must be >= 0"):
        TinyConfig(vocab=VOCAB, refiner_channels=-1)


def test_refiner_is_a_zero_start_residual_over_x_v_sigma():
    """v' = v + refiner([x, v, sigma]) with sigma = timestep / 1000, checked against the parts called by hand once the
    last layer is non-zero; at initialisation the correction is exactly zero."""
    torch.manual_seed(0)
    model = RefinedTransformer(refiner_channels=4, **SD3)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([700.0, 30.0])
    base = SD3Transformer2DModel.forward(model, x, *call_args(2), t, return_dict=False)[0]
    assert torch.equal(model(hidden_states=x, encoder_hidden_states=call_args(2)[0],
                             pooled_projections=call_args(2)[1], timestep=t, return_dict=False)[0], base)
    with torch.no_grad():
        model.refiner[-1].weight.normal_(0.0, 0.1)
    sigma = torch.tensor([0.7, 0.03]).view(2, 1, 1, 1).expand(2, 1, 32, 32)
    expected = base + model.refiner(torch.cat([x, base, sigma], dim=1))
    got = model(hidden_states=x, encoder_hidden_states=call_args(2)[0], pooled_projections=call_args(2)[1],
                timestep=t).sample
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)


def call_args(batch: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 16, generator=g)


def test_refiner_sees_seven_by_seven_pixels():
    """Three 3x3 convolutions: an impulse at one pixel moves the output only within 3 pixels of it."""
    torch.manual_seed(0)
    refiner = build_refiner(3, 3, 8)
    with torch.no_grad():
        refiner[-1].weight.normal_()
    x = torch.zeros(1, 7, 32, 32)
    bumped = x.clone()
    bumped[0, 0, 16, 16] = 1.0
    changed = (refiner(bumped) - refiner(x)).abs().sum(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 19, 13, 19)


def test_with_refiner_keeps_the_velocity_trains_and_round_trips(tmp_path):
    start = small_policy(seed=3)
    grown = start.with_refiner(8, seed=1)
    assert grown.config.refiner_channels == 8 and start.config.refiner_channels == 0
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.1])
    cond = start.encode_prompts(["one red circle", "a blue square"])
    torch.testing.assert_close(grown.velocity(x, sigma, cond), start.velocity(x, sigma, cond), rtol=0, atol=0)
    names = [n for n, _ in grown.transformer.named_parameters()]
    assert sum(n.startswith("refiner.") for n in names) == 6
    assert len(list(grown.trainable_parameters())) == len(names)  # full fine-tuning trains the refiner too
    # one step on a flow-matching loss reaches the refiner (its last layer first: the others' gradients pass through it)
    opt = torch.optim.SGD(grown.trainable_parameters(), lr=0.5)
    loss = (grown.velocity(x, sigma, cond) - torch.ones_like(x)).pow(2).mean()
    loss.backward()
    assert grown.transformer.refiner[-1].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        moved = grown.velocity(x, sigma, cond)
    with torch.no_grad():
        assert not torch.allclose(moved, start.velocity(x, sigma, cond))
    grown.save(tmp_path / "grown")
    back = TinyPolicy.load(tmp_path / "grown")
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["architecture"]["refiner_channels"] == 8
    with torch.no_grad():
        torch.testing.assert_close(back.velocity(x, sigma, cond), moved, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grows a refiner on a full-weight policy that has none"):
        grown.with_refiner(8)


def test_pretrain_init_grows_a_refiner(tmp_path, capsys):
    """`--init DIR --refiner-channels C` keeps the saved weights (lr 0) and adds a zero-output refiner; growing one on
    a model that has one is refused by name (the other architecture flags with --init: test_pretrain)."""
    start = small_policy(seed=3)
    start.save(tmp_path / "start")
    threads = str(torch.get_num_threads())
    assert pretrain.main(["policy", "--init", str(tmp_path / "start"), "--out", str(tmp_path / "out"), "--steps", "1",
                          "--batch-size", "2", "--lr", "0", "--warmup", "1", "--refiner-channels", "4",
                          "--threads", threads]) == 0
    assert "grew a 4-channel pixel refiner" in capsys.readouterr().out
    out = TinyPolicy.load(tmp_path / "out")
    assert out.config.refiner_channels == 4
    before = start.trainable_state_dict()
    after = out.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not v.any() for k, v in after.items() if k.startswith("refiner.4."))  # the zero last layer
    with pytest.raises(SystemExit, match="grows a refiner on a full-weight policy that has none"):
        pretrain.main(["policy", "--init", str(tmp_path / "out"), "--out", str(tmp_path / "x"), "--steps", "1",
                       "--refiner-channels", "4", "--threads", threads])


def test_a_checkpoint_from_before_the_refiner_loads_without_one(tmp_path):
    """config.json written before `refiner_channels` existed (no such key) is a model without a refiner, although
    the default architecture now has one; a key of the wrong type is named."""
    old = small_policy(seed=2)
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["architecture"]["refiner_channels"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert TinyConfig.for_shapes_world().refiner_channels == 32
    back = TinyPolicy.load(tmp_path / "old")
    assert back.config.refiner_channels == 0 and back.transformer.refiner is None
    x, sigma = torch.randn(1, 3, 32, 32), torch.tensor([0.5])
    cond = old.encode_prompts(["a red circle"])
    with torch.no_grad():
        assert torch.equal(back.velocity(x, sigma, cond), old.velocity(x, sigma, cond))
    meta["architecture"]["refiner_channels"] = -3
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bad 'architecture'.*refiner_channels must be >= 0"):
        TinyPolicy.load(tmp_path / "old")
