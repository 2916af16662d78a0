"""SD3 and FLUX backends on tiny pipelines built in code and saved to a local folder (no hub access).

Like diffusers' own `get_dummy_components`, but the tokenizers are built offline from in-memory vocabularies
(a character-level CLIP BPE and a character-level T5 unigram), so nothing is downloaded.
"""

from __future__ import annotations

import shutil
import string

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from rollout_workers.policies import Policy, load_policy
from rollout_workers.policies.flux import FluxPolicy, image_ids, pack_latents, quantize_sigma, unpack_latents
from rollout_workers.policies.sd3 import SD3Policy

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares"]
SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8 latents with 4 channels
TEXT_LEN = 16  # CLIP and T5 sequence length
OPTIONS = dict(height=SIZE, width=SIZE, lora_rank=4, max_sequence_length=TEXT_LEN)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- tiny components
def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN)


def clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=2 + 2 * 26,
        max_position_embeddings=TEXT_LEN,
        projection_dim=32,
    )


def t5_pair(d_model: int) -> tuple[T5EncoderModel, T5Tokenizer]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase] + [
        ("\u2581" + c, -3.0) for c in string.ascii_lowercase
    ]
    config = T5Config(
        vocab_size=len(pieces), d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2, dropout_rate=0.0
    )
    return T5EncoderModel(config), T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    torch.manual_seed(0)
    t5, t5_tok = t5_pair(d_model=64)  # joint attention dim = T5 width >= the two CLIP widths concatenated
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=8,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(clip_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    path = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    torch.manual_seed(0)
    t5, t5_tok = t5_pair(d_model=64)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(clip_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )
    path = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- shared checks
def inputs(policy: Policy, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *policy.latent_shape, generator=g), torch.tensor([0.95, 0.31])[:batch]


def perturb(policy: Policy) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def check_policy(policy: Policy, other: Policy, tmp_path) -> None:
    """Shapes, determinism, LoRA-only training, broadcast and checkpoint round trips, gradients, decode."""
    assert isinstance(policy, Policy) and policy.latent_shape == (4, 8, 8)
    x, sigma = inputs(policy)
    cond = policy.encode_prompts(PROMPTS)
    assert all(t.shape[0] == 2 and t.dtype == torch.float32 for t in cond.values())
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        assert torch.equal(v, policy.velocity(x, sigma, cond))
    assert v.shape == (2, 4, 8, 8) and v.dtype == torch.float32
    v_grad = policy.velocity(x, sigma, cond)
    assert torch.equal(v, v_grad.detach())

    trainable = {id(p) for p in policy.trainable_parameters()}
    named = dict(policy.transformer.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == {n for n in named if "lora_" in n}
    assert trainable == {id(p) for n, p in named.items() if "lora_" in n}
    frozen = [m for k, m in policy.pipe.components.items() if k.startswith(("text_encoder", "vae"))]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    state = policy.trainable_state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} <= {
        "to_q",
        "to_k",
        "to_v",
        "0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }

    v_grad.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())

    perturb(policy)
    with torch.no_grad():
        v_new = policy.velocity(x, sigma, cond)
        assert not torch.equal(v_new, other.velocity(x, sigma, cond))
        other.load_trainable_state_dict(policy.trainable_state_dict())
        assert torch.equal(v_new, other.velocity(x, sigma, cond))

    policy.save(tmp_path / "ckpt")
    restored = type(policy).load(policy.base_path, trainable_from=tmp_path / "ckpt", **OPTIONS)
    with torch.no_grad():
        assert torch.equal(v_new, restored.velocity(x, sigma, cond))

    images = policy.decode(x)
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8


# ------------------------------------------------------------------------------------- SD3
def test_sd3_backend(sd3_dir, tmp_path):
    policy = load_policy("sd3", sd3_dir, **OPTIONS)
    assert isinstance(policy, SD3Policy)
    cond = policy.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (2, 2 * TEXT_LEN, 64)  # CLIP tokens then T5 tokens
    assert cond["pooled_projections"].shape == (2, 64)
    check_policy(policy, SD3Policy.load(sd3_dir, **OPTIONS), tmp_path)


def test_sd3_classifier_free_guidance(sd3_dir):
    plain = SD3Policy.load(sd3_dir, **OPTIONS)
    guided = SD3Policy.load(sd3_dir, **OPTIONS, guidance_scale=3.0)
    cond = guided.encode_prompts(PROMPTS)
    assert set(cond) == {
        "encoder_hidden_states",
        "pooled_projections",
        "negative_encoder_hidden_states",
        "negative_pooled_projections",
    }
    x, sigma = inputs(plain)
    with torch.no_grad():
        v_pos = plain.velocity(x, sigma, plain.encode_prompts(PROMPTS))
        v_neg = plain.velocity(x, sigma, plain.encode_prompts(["", ""]))
        torch.testing.assert_close(guided.velocity(x, sigma, cond), v_neg + 3.0 * (v_pos - v_neg))
    # the learner's gradient flows through the conditional branch only (v_neg detached, as Flow-GRPO does):
    # ∂/∂θ Σ v_guided = s · ∂/∂θ Σ v_pos, computed independently through the unguided policy with the same LoRA
    perturb(guided)
    plain.load_trainable_state_dict(guided.trainable_state_dict())
    guided.velocity(x, sigma, cond).sum().backward()
    (3.0 * plain.velocity(x, sigma, plain.encode_prompts(PROMPTS)).sum()).backward()
    for a, b in zip(guided.trainable_parameters(), plain.trainable_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # sampling runs both branches as one batch of 2B; under autograd only the B conditional rows build a graph
    calls = []
    hook = guided.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs["hidden_states"].shape[0], torch.is_grad_enabled())),
        with_kwargs=True)
    try:
        with torch.no_grad():
            sampled = guided.velocity(x, sigma, cond)
        trained = guided.velocity(x, sigma, cond)
    finally:
        hook.remove()
    assert calls == [(4, False), (2, False), (2, True)]
    torch.testing.assert_close(trained, sampled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_bf16_weights_autocast_and_checkpointing(backend, sd3_dir, flux_dir):
    path = {"sd3": sd3_dir, "flux": flux_dir}[backend]
    policy = load_policy(
        backend, path, weights_dtype="bfloat16", autocast_bf16=True, gradient_checkpointing=True, **OPTIONS
    )
    assert policy.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # fp32 adapter
    x, sigma = inputs(policy)
    v = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert policy.decode(x).shape == (2, SIZE, SIZE, 3)


def test_local_folder_errors(sd3_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_policy("sd3", tmp_path / "nowhere", **OPTIONS)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3Policy.load(tmp_path, **OPTIONS)
    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=f"{broken}.*subfolder 'vae'"):
        SD3Policy.load(broken, **OPTIONS)
    with pytest.raises(ValueError, match="multiples of 4"):
        SD3Policy.load(sd3_dir, **{**OPTIONS, "height": 18})
    with pytest.raises(FileNotFoundError, match="missing trainable.json"):
        SD3Policy.load(sd3_dir, trainable_from=tmp_path, **OPTIONS)


# ------------------------------------------------------------------------------------- FLUX
def test_flux_backend(flux_dir, tmp_path):
    policy = load_policy("flux", flux_dir, **OPTIONS)
    assert isinstance(policy, FluxPolicy)
    cond = policy.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (2, TEXT_LEN, 64) and cond["pooled_projections"].shape == (
        2,
        32,
    )
    check_policy(policy, FluxPolicy.load(flux_dir, **OPTIONS), tmp_path)


def test_flux_conditions_on_quantised_sigma_and_guidance(flux_dir):
    policy = FluxPolicy.load(flux_dir, **OPTIONS)
    x, _ = inputs(policy)
    cond = policy.encode_prompts(PROMPTS)
    assert torch.equal(
        quantize_sigma(torch.tensor([0.5003, 0.5007, 1.0, 0.0])), torch.tensor([0.5, 0.5, 1.0, 0.0])
    )
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.5003, 0.2]), cond)
        assert torch.equal(v, policy.velocity(x, torch.tensor([0.5007, 0.2]), cond))  # same 1/1000 bucket
        assert not torch.equal(v, policy.velocity(x, torch.tensor([0.5013, 0.2]), cond))
        policy.guidance_scale = 5.0
        assert not torch.equal(v, policy.velocity(x, torch.tensor([0.5003, 0.2]), cond))


def test_flux_packing_matches_the_pipeline():
    x = torch.randn(2, 4, 8, 6)  # (B, C, h, w)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(unpack_latents(packed, 8, 6), FluxPipeline._unpack_latents(packed, 16, 12, 2))
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32)
    assert torch.equal(image_ids(8, 6, torch.device("cpu"), torch.float32), ids)
