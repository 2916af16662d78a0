"""The tiny pixel-space policy: shapes, determinism, checkpoints, trainable state, LoRA, gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rollout_workers.policies import (
    BACKENDS,
    Policy,
    cond_cat,
    cond_index,
    cond_repeat_interleave,
    load_policy,
)
from rollout_workers.policies.tiny import TinyConfig, TinyPolicy

VOCAB = ("a", "one", "two", "red", "blue", "circle", "circles", "square", "left", "of")
PROMPTS = ["one red circle", "two blue circles left of a square", "a blue square"]


def small_config(**sizes) -> TinyConfig:
    base = dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        text_hidden_size=32,
        text_intermediate_size=64,
    )
    return TinyConfig(vocab=VOCAB, **(base | sizes))


def perturb(policy: TinyPolicy, seed: int = 1, std: float = 0.05) -> None:
    """Move the trainable weights away from their init (LoRA B starts at 0, so outputs would not differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and immune to OpenMP spinning on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def policy() -> TinyPolicy:
    return TinyPolicy.from_config(small_config(), seed=0)


def inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, generator=g)  # (B, 3, H, W), (B,)


def test_satisfies_protocol_and_velocity_shape(policy):
    assert isinstance(policy, Policy)
    assert policy.latent_shape == (3, 32, 32)
    x, sigma = inputs()
    v = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS))
    assert v.shape == (3, 3, 32, 32) and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_velocity_is_deterministic_with_and_without_grad(policy):
    x, sigma = inputs()
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        v1 = policy.velocity(x, sigma, cond)
        v2 = policy.velocity(x, sigma, cond)
    v3 = policy.velocity(x, sigma, cond)
    assert v3.requires_grad
    assert torch.equal(v1, v2) and torch.equal(v1, v3.detach())
    policy.train(True)
    assert torch.equal(v1, policy.velocity(x, sigma, cond).detach())


def test_velocity_depends_on_sigma_and_prompt(policy):
    x, sigma = inputs()
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        assert not torch.allclose(v, policy.velocity(x, 1.0 - sigma, cond))
        assert not torch.allclose(v, policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[::-1])))


def test_encode_prompts_batch_first_and_deterministic(policy):
    cond = policy.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (3, 12, 32)
    assert cond["pooled_projections"].shape == (3, 32)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in cond.values())
    again = policy.encode_prompts(["ONE Red circle", *PROMPTS[1:]])  # lower-cased
    assert all(torch.equal(cond[k], again[k]) for k in cond)


def test_tokenizer_fails_loud(policy):
    ids = policy.tokenize(["one red circle"])
    assert ids.shape == (1, 12) and ids[0, :5].tolist() == [2, 5, 7, 9, 3] and (ids[0, 5:] == 0).all()
    with pytest.raises(ValueError, match="outside the tiny policy's vocabulary.*'green'"):
        policy.encode_prompts(["one green circle"])
    with pytest.raises(ValueError, match="at most 10"):
        policy.encode_prompts([" ".join(["red"] * 11)])
    with pytest.raises(TypeError):
        policy.encode_prompts("one red circle")


def test_same_seed_same_weights():
    a, b, c = (TinyPolicy.from_config(small_config(), seed=s) for s in (0, 0, 1))
    sa, sb, sc = (p.trainable_state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_round_trip(policy, tmp_path):
    perturb(policy)
    policy.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert (
        meta["format_version"] == 1 and meta["architecture"]["vocab"] == list(VOCAB) and meta["lora"] is None
    )
    loaded = load_policy("tiny", tmp_path)
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(
            policy.velocity(x, sigma, policy.encode_prompts(PROMPTS)),
            loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS)),
        )


def test_load_errors_name_the_path_and_problem(policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TinyPolicy.load(tmp_path / "nowhere")
    policy.save(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        TinyPolicy.load(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TinyPolicy.load(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*missing model.safetensors"):
        TinyPolicy.load(tmp_path)


def test_load_rejects_wrong_version_and_mismatched_weights(policy, tmp_path):
    policy.save(tmp_path)
    config_file = tmp_path / "config.json"
    meta = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        TinyPolicy.load(tmp_path)
    arch = meta["architecture"] | {"attention_head_dim": 8}
    config_file.write_text(json.dumps(meta | {"architecture": arch}))
    with pytest.raises(ValueError, match="shape mismatches"):
        TinyPolicy.load(tmp_path)
    config_file.write_text(json.dumps(meta | {"architecture": meta["architecture"] | {"num_layers": 3}}))
    with pytest.raises(ValueError, match="missing keys"):
        TinyPolicy.load(tmp_path)
    config_file.write_text(json.dumps(meta | {"architecture": meta["architecture"] | {"num_layers": 1}}))
    with pytest.raises(ValueError, match="unexpected keys"):
        TinyPolicy.load(tmp_path)


def test_trainable_state_dict_round_trip(policy):
    perturb(policy)
    other = TinyPolicy.from_config(small_config(), seed=5)
    state = policy.trainable_state_dict()
    assert set(state) == {n for n, _ in policy.transformer.named_parameters()}
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    other.load_trainable_state_dict(state)
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(
            policy.velocity(x, sigma, policy.encode_prompts(PROMPTS)),
            other.velocity(x, sigma, policy.encode_prompts(PROMPTS)),
        )
    perturb(policy, seed=2)  # the broadcast copy does not alias the live weights
    assert all(torch.equal(state[k], v) for k, v in other.trainable_state_dict().items())
    with pytest.raises(ValueError, match="missing keys"):
        other.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})


def test_lora_trains_only_the_adapter(tmp_path):
    base = TinyPolicy.from_config(small_config(), seed=0)
    lora = TinyPolicy.from_config(small_config(), seed=0, lora_rank=4, lora_alpha=8)
    grads = {n: p.requires_grad for n, p in lora.transformer.named_parameters()}
    assert {n for n, g in grads.items() if g} == {n for n in grads if "lora_" in n} != set()
    assert not any(p.requires_grad for p in lora.text_encoder.parameters())
    state = lora.trainable_state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert sum(t.numel() for t in state.values()) == lora.num_parameters()["trainable"]
    x, sigma = inputs()
    with torch.no_grad():  # B = 0 at init: the adapter starts as the identity
        assert torch.equal(
            base.velocity(x, sigma, base.encode_prompts(PROMPTS)),
            lora.velocity(x, sigma, lora.encode_prompts(PROMPTS)),
        )
    perturb(lora)
    other = TinyPolicy.from_config(small_config(), seed=0, lora_rank=4, lora_alpha=8)
    other.load_trainable_state_dict(lora.trainable_state_dict())
    lora.save(tmp_path)
    reloaded = TinyPolicy.load(tmp_path)
    assert reloaded.trainable.lora_rank == 4
    with torch.no_grad():
        v = lora.velocity(x, sigma, lora.encode_prompts(PROMPTS))
        assert not torch.equal(v, base.velocity(x, sigma, base.encode_prompts(PROMPTS)))
        assert torch.equal(v, other.velocity(x, sigma, other.encode_prompts(PROMPTS)))
        assert torch.equal(v, reloaded.velocity(x, sigma, reloaded.encode_prompts(PROMPTS)))
    with pytest.raises(ValueError, match="rank-4 LoRA adapter"):
        TinyPolicy.load(tmp_path, lora_rank=8)


def test_lora_over_full_checkpoint(policy, tmp_path):
    perturb(policy)
    policy.save(tmp_path)
    a = TinyPolicy.load(tmp_path, lora_rank=2)
    b = TinyPolicy.load(tmp_path, lora_rank=2)
    assert all(torch.equal(v, b.trainable_state_dict()[k]) for k, v in a.trainable_state_dict().items())
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(
            a.velocity(x, sigma, a.encode_prompts(PROMPTS)),
            policy.velocity(x, sigma, policy.encode_prompts(PROMPTS)),
        )


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_flows_to_trainable_parameters(lora_rank):
    policy = TinyPolicy.from_config(small_config(), seed=0, lora_rank=lora_rank)
    perturb(policy)
    x, sigma = inputs()
    policy.velocity(x, sigma, policy.encode_prompts(PROMPTS)).square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in policy.text_encoder.parameters())


def test_gradient_checkpointing_matches():
    plain = TinyPolicy.from_config(small_config(), seed=0)
    ckpt = TinyPolicy.from_config(small_config(), seed=0, gradient_checkpointing=True)
    x, sigma = inputs()
    for p in (plain, ckpt):
        p.velocity(x, sigma, p.encode_prompts(PROMPTS)).square().mean().backward()
    for a, b in zip(plain.trainable_parameters(), ckpt.trainable_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_autocast_bf16_returns_fp32_close_to_fp32(policy):
    x, sigma = inputs()
    cond = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        v32 = policy.velocity(x, sigma, cond)
        policy.autocast_bf16 = True
        v16 = policy.velocity(x, sigma, cond)
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()


def test_decode_maps_to_uint8(policy):
    x = torch.zeros(2, 3, 32, 32)
    x[0] = -2.0  # clamped to -1 -> 0
    x[1, 0] = 1.0
    images = policy.decode(x)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert (images[0] == 0).all() and (images[1, ..., 0] == 255).all() and (images[1, ..., 1] == 128).all()


def test_cond_helpers(policy):
    cond = policy.encode_prompts(PROMPTS)  # B = 3
    rep = cond_repeat_interleave(cond, 2)
    assert rep["pooled_projections"].shape[0] == 6
    assert torch.equal(rep["pooled_projections"][2], cond["pooled_projections"][1])
    picked = cond_index(rep, [2, 3])
    assert torch.equal(picked["encoder_hidden_states"][1], cond["encoder_hidden_states"][1])
    assert torch.equal(
        cond_cat([cond_index(cond, slice(0, 1)), cond_index(cond, torch.tensor([1, 2]))])[
            "pooled_projections"
        ],
        cond["pooled_projections"],
    )
    with pytest.raises(ValueError, match="key sets differ"):
        cond_cat([cond, {"pooled_projections": cond["pooled_projections"]}])


def test_boundary_errors(policy, tmp_path):
    x, sigma = inputs()
    cond = policy.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="x must be"):
        policy.velocity(x[:, :2], sigma, cond)
    with pytest.raises(ValueError, match="sigma must be"):
        policy.velocity(x, sigma[:2], cond)
    with pytest.raises(ValueError, match="batch 2"):
        policy.velocity(x, sigma, cond_index(cond, [0, 1]))
    with pytest.raises(ValueError, match="height must be 32"):
        TinyPolicy.from_config(small_config(), height=64)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        TinyPolicy.from_config(small_config(), guidance_scale=0.5)
    with pytest.raises(ValueError, match="unknown policy backend 'sdxl'"):
        load_policy("sdxl", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_policy("tiny", tmp_path / "missing")
    assert set(BACKENDS) == {"tiny", "sd3", "flux"}


def test_shapes_world_vocabulary_fits():
    shapes_world = pytest.importorskip("services.shapes_world")
    if not hasattr(shapes_world, "VOCABULARY"):
        pytest.skip("services.shapes_world has no VOCABULARY yet")
    policy = TinyPolicy.from_config(TinyConfig.for_shapes_world(**{"num_layers": 1, "text_layers": 1}))
    prompts = shapes_world.sample_prompts(64, np.random.default_rng(0))
    assert policy.encode_prompts(prompts)["encoder_hidden_states"].shape == (64, 12, 64)


def test_guidance_encodes_the_empty_prompt_once_and_hands_out_copies():
    """The negative branch's states are the empty prompt's, encoded at the first call only (the text encoder is
    frozen); every cond gets its own copy, so a caller writing into one cannot change the next; `to` re-encodes."""
    guided = TinyPolicy.from_config(small_config(), seed=0, guidance_scale=3.0)
    batches = []
    guided.text_encoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]
                                                                                       if args else -1))
    first = guided.encode_prompts(PROMPTS)
    second = guided.encode_prompts(PROMPTS[:1])
    assert len(batches) == 3  # the first call's prompts, its empty prompt; the second call's prompts only
    torch.testing.assert_close(second["negative_pooled_projections"], first["negative_pooled_projections"][:1])
    first["negative_pooled_projections"].add_(1.0)
    first["negative_encoder_hidden_states"].add_(1.0)
    third = guided.encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(third["negative_pooled_projections"], second["negative_pooled_projections"])
    torch.testing.assert_close(third["negative_encoder_hidden_states"], second["negative_encoder_hidden_states"])
    guided.to("cpu")
    guided.encode_prompts(PROMPTS[:1])
    assert len(batches) == 6  # after `to`, the empty prompt was encoded again


def test_classifier_free_guidance_against_two_plain_calls():
    """guidance_scale s: v = v("") + s·(v(prompt) − v("")), computed here from two unguided calls; the gradient
    flows through the prompt's branch only, so it is s times the unguided one."""
    plain = TinyPolicy.from_config(small_config(), seed=0)
    guided = TinyPolicy.from_config(small_config(), seed=0, guidance_scale=3.0)
    perturb(plain)
    guided.load_trainable_state_dict(plain.trainable_state_dict())
    cond = guided.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states",
                         "negative_pooled_projections"}
    empty = plain.encode_prompts([""] * len(PROMPTS))  # [BOS][EOS]: the unconditional prompt
    torch.testing.assert_close(cond["negative_pooled_projections"], empty["pooled_projections"])
    x, sigma = inputs()
    with torch.no_grad():
        v_pos = plain.velocity(x, sigma, plain.encode_prompts(PROMPTS))
        v_neg = plain.velocity(x, sigma, empty)
        v = guided.velocity(x, sigma, cond)
    torch.testing.assert_close(v, v_neg + 3.0 * (v_pos - v_neg), rtol=1e-5, atol=1e-5)
    assert (v - v_pos).abs().max() > 1e-3  # guidance changed the velocity
    # sub-batches of a guided cond stay guided (the sampler indexes cond like the latents)
    torch.testing.assert_close(guided.velocity(x[1:], sigma[1:], cond_index(cond, [1, 2])), v[1:],
                               rtol=1e-5, atol=1e-5)
    guided.velocity(x, sigma, cond).sum().backward()
    (3.0 * plain.velocity(x, sigma, plain.encode_prompts(PROMPTS))).sum().backward()
    # fp32 summation order differs between the batched (cond, uncond) forward and the plain one: per tensor, an
    # absolute tolerance of 1e-4 of its largest gradient (a wrong factor s would miss by 2/3 of every value)
    for a, b in zip(guided.trainable_parameters(), plain.trainable_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 + 1e-4 * float(b.grad.abs().max()))
