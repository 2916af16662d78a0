"""Stable Diffusion 3 / 3.5 policy from a local diffusers pipeline folder (latent space, LoRA via peft).

    policy = SD3Policy.load("/models/sd3.5-medium", height=512, width=512, lora_rank=32, guidance_scale=4.5)
    cond = policy.encode_prompts(prompts)        # the pipeline's own encode_prompt (CLIP-L, CLIP-G, T5)
    v = policy.velocity(x, sigma, cond)          # x (B, 16, H/8, W/8) VAE latents (scaled)

The folder is what `StableDiffusion3Pipeline.save_pretrained` writes (transformer, vae, text_encoder{,_2,_3},
tokenizer{,_2,_3}, scheduler); it is read with local_files_only=True. The transformer is conditioned on
timestep = 1000 * sigma, as the pipeline does with FlowMatchEulerDiscreteScheduler. With
guidance_scale > 1 the velocity is classifier-free guided, v = v_neg + s (v_pos - v_neg), with the
negative prompt's embeddings carried per sample in the cond (the learner recomputes the same guided
velocity, with v_neg detached: gradients flow through the conditional branch only). Text encoders and VAE are frozen; the transformer trains through a LoRA adapter (or fully
with lora_rank 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from .base import (
    DEFAULT_LORA_TARGETS,
    Cond,
    cfg_scale,
    check_velocity_inputs,
    load_diffusers_policy,
    release_pipeline_parts,
    require_inference_parts,
    save_trainable,
    sd3_transformer_velocity,
    vae_decode,
)
from .trainable import TrainableTransformer, TransformerPolicy

SUBFOLDERS = (
    "transformer",
    "vae",
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)


class SD3Policy(TransformerPolicy):
    """SD3 MM-DiT policy over VAE latents; satisfies `base.Policy`.

    Cond keys: "encoder_hidden_states" (B, L, D_joint), "pooled_projections" (B, D_pooled), and with
    guidance_scale > 1 also "negative_encoder_hidden_states", "negative_pooled_projections"; all fp32.
    """

    name = "sd3"

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        *,
        height: int = 512,
        width: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 0.0,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        autocast_bf16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        scale = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if height % scale or width % scale:
            raise ValueError(
                f"height and width must be multiples of {scale} for this SD3 model, got {height}x{width}"
            )
        self.pipe = pipe
        self.transformer = pipe.transformer.eval()  # eval throughout: velocity is deterministic
        self.vae = pipe.vae.eval().requires_grad_(False)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
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
        self.guidance_scale = cfg_scale(guidance_scale)
        self.negative_prompt = negative_prompt
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
    ) -> SD3Policy:
        """Load from a local pipeline folder; `weights_dtype` is the dtype of the frozen weights;
        `trainable_from` a folder written by `save` whose adapter (or transformer) replaces the initial
        one.
        """
        return load_diffusers_policy(cls, StableDiffusion3Pipeline, SUBFOLDERS, path, weights_dtype=weights_dtype,
                                     trainable_from=trainable_from, options=options)

    def save(self, path: str | Path) -> None:
        """Only the trainable weights (`trainable.safetensors`, `trainable.json`); not the base folder."""
        save_trainable(path, self.trainable, {"backend": self.name, "base_path": self.base_path})

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The pipeline's encode_prompt; every tensor (B, ...) fp32 (see the class docstring for keys)."""
        require_inference_parts(self)
        if isinstance(prompts, str):
            raise TypeError("encode a list of prompts, not a single string")
        prompts = list(prompts)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=self.cfg,
            negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": pos.float(), "pooled_projections": pooled.float()}
        if self.cfg:
            cond |= {
                "negative_encoder_hidden_states": neg.float(),
                "negative_pooled_projections": neg_pooled.float(),
            }
        return cond

    def _forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """x (B, C, h, w) latents, sigma (B,) in [0, 1] -> v (B, C, h, w) fp32 (`sd3_transformer_velocity`)."""
        check_velocity_inputs(x, sigma, cond, self.latent_shape)
        return sd3_transformer_velocity(transformer, x, sigma, cond, device=self.device,
                                        guidance_scale=self.guidance_scale, autocast_bf16=self.autocast_bf16)

    def decode(self, x: Tensor) -> np.ndarray:
        """x (B, C, h, w) latents -> uint8 (B, H, W, 3)."""
        require_inference_parts(self)
        return vae_decode(self.vae, x.to(self.device))

    def release_inference_parts(self) -> None:
        """Drop the VAE and text encoders (the learner trains on recorded latents and conditioning)."""
        release_pipeline_parts(self, ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))

    def to(self, device: str | torch.device) -> SD3Policy:
        self.device = torch.device(device)
        self.pipe.to(self.device)
        self.trainable.to(self.device)
        return self
