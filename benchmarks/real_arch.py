"""Randomly initialised pipelines with the real SD3.5-Medium and FLUX.1-dev architectures, for timing.

A transformer with random weights costs the same compute as a trained one, so the rollout and update times of a
real run can be measured without the weights (nothing comes from a model hub). What is built:

- the **transformer** from the real architecture config (SD3.5-Medium: 24 MMDiT-X blocks, 1536 wide, 2.5 B
  parameters; FLUX.1-dev: 19 double and 38 single blocks, 3072 wide, guidance embedding, 11.9 B), in the given
  dtype, on the given device (building FLUX on a GPU takes seconds, on a CPU minutes);
- the **VAE** with the real 16-channel architecture and the model's shift and scale factors;
- the **text encoders** at their real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) but `text_layers` layers each
  (real: 12, 32, 24) and character-level tokenizers built offline. The prompt is encoded once per rollout, not
  per step, so this lowers a rollout's time by a few forward passes of the text stack, stated wherever the
  numbers are used.

`transformer_layers` scales the transformer down for smoke tests on a CPU (the tests build one block).

    python -c "from benchmarks.real_arch import build; build('sd3_5_medium', '/tmp/sd35m', device='cuda')"
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

ARCHITECTURES = ("sd3_5_medium", "flux_dev")
TEXT_LEN = 77  # CLIP's positions; T5 takes the preset's max_sequence_length (SD3: 256, FLUX: 512) of the same text
VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
             layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
VAE_FACTORS = {"sd3_5_medium": dict(shift_factor=0.0609, scaling_factor=1.5035),
               "flux_dev": dict(shift_factor=0.1159, scaling_factor=0.3611)}


def sd3_5_medium_transformer(layers: int = 24):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(min(13, layers))),
        qk_norm="rms_norm")


def flux_dev_transformer(double: int = 19, single: int = 38):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN)


def clip_encoder(hidden: int, heads: int, ffn: int, layers: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                            intermediate_size=ffn, num_attention_heads=heads, num_hidden_layers=layers,
                            vocab_size=2 + 2 * 26, max_position_embeddings=TEXT_LEN, projection_dim=hidden)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_xxl(layers: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase] + [("\u2581" + c, -3.0) for c in string.ascii_lowercase]
    config = T5Config(vocab_size=len(pieces), d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=layers,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config), T5Tokenizer(vocab=pieces, extra_ids=0)


def build(architecture: str, out: str | Path, *, transformer_layers: int | None = None, text_layers: int = 1,
          dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> Path:
    """Save a diffusers pipeline folder with random weights of `architecture` to `out` and return its path."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    out = Path(out)
    with torch.device(device):
        vae = AutoencoderKL(**VAE16, **VAE_FACTORS[architecture])
        t5, t5_tok = t5_xxl(text_layers)
        if architecture == "sd3_5_medium":
            transformer = sd3_5_medium_transformer(transformer_layers or 24)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                text_encoder=clip_encoder(768, 12, 3072, text_layers, True), tokenizer=clip_tokenizer(),
                text_encoder_2=clip_encoder(1280, 20, 5120, text_layers, True), tokenizer_2=clip_tokenizer(),
                text_encoder_3=t5, tokenizer_3=t5_tok)
        else:
            layers = (transformer_layers, transformer_layers) if transformer_layers else (19, 38)
            pipe = FluxPipeline(
                transformer=flux_dev_transformer(*layers), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=vae, text_encoder=clip_encoder(768, 12, 3072, text_layers, False), tokenizer=clip_tokenizer(),
                text_encoder_2=t5, tokenizer_2=t5_tok)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out)
    return out


def parameter_count(folder: str | Path, component: str = "transformer") -> int:
    """Parameters of one saved component, counted on the meta device from its config."""
    import json

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel}
    config = json.loads((Path(folder) / component / "config.json").read_text())
    with torch.device("meta"):
        model = cls[config["_class_name"]].from_config(config)
    return sum(p.numel() for p in model.parameters())
