"""FLUX.1 policy from a local diffusers pipeline folder (packed latents, guidance embedding, LoRA via peft).

    policy = FluxPolicy.load("/models/flux1-dev", height=720, width=720, lora_rank=32, guidance_scale=3.5)
    cond = policy.encode_prompts(prompts)        # the pipeline's own encode_prompt (CLIP pooled, T5 sequence)
    v = policy.velocity(x, sigma, cond)          # x (B, 16, H/8, W/8) VAE latents (scaled), unpacked

The sampler sees plain (B, C, h, w) latents; `velocity` packs them into FLUX's 2x2 patch sequence,
builds img_ids / txt_ids like FluxPipeline, and unpacks the prediction. Timestep quantisation: the
transformer is conditioned on sigma_q = floor(1000 sigma) / 1000 (passed as `timestep`, which
FluxTransformer2DModel multiplies by 1000 internally), as in the MixGRPO reference. Rollout and
learner both call this method, so both use the same quantised value. The guidance-distilled
embedding gets `guidance_scale` (FLUX.1-dev: 3.5); there is no classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from torch import Tensor, nn

from .base import (
    DEFAULT_LORA_TARGETS,
    Cond,
    check_velocity_inputs,
    cond_to,
    load_diffusers_policy,
    release_pipeline_parts,
    require_inference_parts,
    save_trainable,
    vae_decode,
)
from .trainable import TrainableTransformer, TransformerPolicy

SUBFOLDERS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def quantize_sigma(sigma: Tensor) -> Tensor:
    """sigma (B,) -> floor(1000 sigma) / 1000 in fp32 (the value FLUX is conditioned on)."""
    return torch.floor(sigma.float() * 1000.0) / 1000.0


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches in row-major order, as FluxPipeline packs."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w); the inverse of `pack_latents`."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids of the packed image tokens: (h/2 * w/2, 3) = (0, row, col)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class FluxPolicy(TransformerPolicy):
    """FLUX MM-DiT policy over VAE latents; satisfies `base.Policy`.

    Cond keys: "encoder_hidden_states" (B, L, D_t5) and "pooled_projections" (B, D_clip), fp32.
    """

    name = "flux"

    def __init__(
        self,
        pipe: FluxPipeline,
        *,
        height: int = 512,
        width: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 0.0,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
        autocast_bf16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        scale = pipe.vae_scale_factor * 2  # VAE downsampling times the 2x2 packing
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of {scale} for FLUX, got {height}x{width}")
        if not pipe.transformer.config.guidance_embeds and guidance_scale != 1.0:
            raise ValueError("this FLUX transformer has no guidance embedding; guidance_scale must be 1.0")
        self.pipe = pipe
        self.transformer = pipe.transformer.eval()  # eval throughout: velocity is deterministic
        self.vae = pipe.vae.eval().requires_grad_(False)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            encoder.eval().requires_grad_(False)
        self.trainable = TrainableTransformer(
            self.transformer, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets
        )
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.latent_shape = (
            pipe.vae.config.latent_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.autocast_bf16 = autocast_bf16
        self.device = torch.device("cpu")
        self.training = False
        self.base_path: str | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        weights_dtype: str = "float32",
        trainable_from: str | Path | None = None,
        **options,
    ) -> FluxPolicy:
        """Load from a local pipeline folder; `weights_dtype` is the dtype of the frozen weights;
        `trainable_from` a folder written by `save` whose adapter (or transformer) replaces the initial
        one.
        """
        return load_diffusers_policy(cls, FluxPipeline, SUBFOLDERS, path, weights_dtype=weights_dtype,
                                     trainable_from=trainable_from, options=options)

    def save(self, path: str | Path) -> None:
        """Only the trainable weights (`trainable.safetensors`, `trainable.json`); not the base folder."""
        save_trainable(path, self.trainable, {"backend": self.name, "base_path": self.base_path})

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The pipeline's encode_prompt -> {"encoder_hidden_states", "pooled_projections"}, (B, ...) fp32."""
        require_inference_parts(self)
        if isinstance(prompts, str):
            raise TypeError("encode a list of prompts, not a single string")
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def _forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """x (B, C, h, w) latents, sigma (B,) in [0, 1] -> v (B, C, h, w) fp32; quantised sigma."""
        check_velocity_inputs(x, sigma, cond, self.latent_shape)
        dtype = transformer.dtype
        cond = cond_to(cond, self.device, dtype)
        b, _, h, w = x.shape
        context = cond["encoder_hidden_states"]  # (B, L, D_t5)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=self.device, dtype=torch.float32)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            v = transformer(
                hidden_states=pack_latents(x.to(self.device, dtype)),  # (B, h/2 * w/2, 4C)
                timestep=quantize_sigma(sigma.to(self.device)),
                guidance=guidance,
                pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=context,
                txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=dtype),
                img_ids=image_ids(h, w, self.device, dtype),
                return_dict=False,
            )[0]
        return unpack_latents(v.float(), h, w)

    def decode(self, x: Tensor) -> np.ndarray:
        """x (B, C, h, w) latents -> uint8 (B, H, W, 3)."""
        require_inference_parts(self)
        return vae_decode(self.vae, x.to(self.device))

    def release_inference_parts(self) -> None:
        """Drop the VAE and text encoders (the learner trains on recorded latents and conditioning)."""
        release_pipeline_parts(self, ("vae", "text_encoder", "text_encoder_2"))

    def to(self, device: str | torch.device) -> FluxPolicy:
        self.device = torch.device(device)
        self.pipe.to(self.device)
        self.trainable.to(self.device)
        return self
