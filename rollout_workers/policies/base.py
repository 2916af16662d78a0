"""The policy protocol every backend satisfies, and the small helpers the backends share.

Conventions (the same as `learner/algo`): noise level sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps,
and the model predicts the velocity v ~ eps - x0. The sampler calls `policy.velocity(x, sigma, cond)`;
the learner calls the same method with gradients on, so `velocity` must be a deterministic function of
its inputs: every backend keeps its modules in eval mode (no dropout can fire) and LoRA dropout is 0.

A `Cond` is the encoded prompt batch: a dict of batch-first tensors (dim 0 is the sample), so the
sampler can `repeat_interleave` it over a group and index it like the latents. Keys are per backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .trainable import TrainableTransformer

Cond = dict[str, Tensor]

# Attention projections of the MM-DiT blocks (SD3 joint blocks, FLUX double and single blocks).
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


@runtime_checkable
class Policy(Protocol):
    name: str
    latent_shape: tuple[int, int, int]  # (C, H, W) of x
    device: torch.device

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Deterministic prompt encoding without gradients; every tensor is (B, ...) and fp32."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """x (B, C, H, W), sigma (B,) fp32 in [0, 1] -> velocity (B, C, H, W) fp32."""
        ...

    def reference_velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """The reference (starting) policy's velocity, no gradients: the adapter switched off for LoRA, the frozen
        copy `keep_reference` made otherwise."""
        ...

    def keep_reference(self) -> None:
        """Make `reference_velocity` available (full fine-tuning: copies the starting transformer)."""
        ...

    def decode(self, x: Tensor) -> np.ndarray:
        """Final sample (B, C, H, W) -> uint8 images (B, H_img, W_img, 3)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a weight broadcast carries (full transformer or LoRA adapter only): CPU copies of the live weights
        (`TrainableTransformer.state_dict`)."""
        ...

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None: ...

    def save(self, path: str | Path) -> None: ...

    def train(self, mode: bool = True) -> Policy: ...

    def to(self, device: str | torch.device) -> Policy: ...


# ----------------------------------------------------------------------------- cond helpers
def cond_repeat_interleave(cond: Cond, n: int) -> Cond:
    """Each prompt's entry repeated n times in place: (B, ...) -> (B * n, ...), group members adjacent."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def cond_index(cond: Cond, idx: Tensor | slice | Sequence[int]) -> Cond:
    """Select samples along dim 0 (a slice, an index list or a 1-D index / boolean tensor)."""
    if not isinstance(idx, slice | Tensor):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate along dim 0; all conds must have the same keys."""
    if not conds:
        raise ValueError("cond_cat needs at least one cond")
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"cond_cat: key sets differ: {sorted(keys)} vs {sorted(c)}")
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def cond_to(cond: Cond, device: torch.device, dtype: torch.dtype | None = None) -> Cond:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in cond.items()}


def check_velocity_inputs(x: Tensor, sigma: Tensor, cond: Cond, latent_shape: tuple[int, int, int]) -> None:
    """Fail at the boundary: x (B, C, H, W) with (C, H, W) = latent_shape, sigma (B,), cond batch B."""
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"x must be (B, {', '.join(map(str, latent_shape))}), got {tuple(x.shape)}")
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be ({x.shape[0]},), got {tuple(sigma.shape)}")
    for k, v in cond.items():
        if v.shape[0] != x.shape[0]:
            raise ValueError(f"cond[{k!r}] has batch {v.shape[0]}, x has {x.shape[0]}")


# ----------------------------------------------------------------------------- SD3-architecture velocity
def cfg_scale(scale: float) -> float:
    """A classifier-free guidance scale, checked: >= 1 (1 = no guidance)."""
    if scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no classifier-free guidance), got {scale}")
    return float(scale)


def sd3_transformer_velocity(transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond, *, device: torch.device,
                             guidance_scale: float, autocast_bf16: bool) -> Tensor:
    """The velocity of an `SD3Transformer2DModel` (SD3 and the tiny model share it): x (B, C, h, w), sigma (B,) in
    [0, 1], timestep = 1000 * sigma (the diffusers FlowMatch convention) -> v (B, C, h, w) fp32.

    With guidance_scale s > 1 it is classifier-free guided, v = v_neg + s (v_pos − v_neg), from cond's "negative_*"
    states. As Flow-GRPO's SD3 trainer does (scripts/train_sd3.py, compute_log_prob, at ac4c86e), the negative
    branch is a constant of the update: with gradients on both, s = 4.5 would add −3.5·∂v_neg/∂θ.

    Without autograd (sampling) both branches run as one batch of 2B, [negative; positive]. With autograd (the
    learner) the negative branch runs apart, under no_grad, and only the B positive rows build a graph: the same
    value and gradient as one 2B batch whose negative half is detached (what the reference runs), at about 5 row
    passes per sample instead of 8 under gradient checkpointing (forward, recomputation and a backward of twice a
    forward, on B rows rather than 2B), and half the activation memory."""
    cond = cond_to(cond, device, transformer.dtype)
    hidden = x.to(device, transformer.dtype)
    context, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    timestep = 1000.0 * sigma.to(device, torch.float32)  # (B,)

    def run(h: Tensor, c: Tensor, p: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            return transformer(hidden_states=h, encoder_hidden_states=c, pooled_projections=p, timestep=t,
                               return_dict=False)[0].float()

    if guidance_scale <= 1.0:
        return run(hidden, context, pooled, timestep)
    negative = cond["negative_encoder_hidden_states"], cond["negative_pooled_projections"]
    if torch.is_grad_enabled():
        with torch.no_grad():
            v_neg = run(hidden, *negative, timestep)
        v_pos = run(hidden, context, pooled, timestep)
    else:
        ones = [1] * (hidden.ndim - 1)
        v_neg, v_pos = run(hidden.repeat(2, *ones), torch.cat([negative[0], context]), torch.cat([negative[1], pooled]),
                           timestep.repeat(2)).chunk(2)
    return v_neg + guidance_scale * (v_pos - v_neg)


# ----------------------------------------------------------------------------- images
def to_uint8_images(images: Tensor) -> np.ndarray:
    """images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3); values outside are clamped."""
    pixels = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- state dicts
def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    """Raise ValueError naming missing / unexpected keys and shape mismatches against `expected`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def cpu_copy(named: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in named.items()}


# ----------------------------------------------------------------------------- diffusers pipeline folders
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(pipeline_cls: type, path: str | Path, subfolders: Sequence[str], weights_dtype: str):
    """Load a diffusers pipeline from a LOCAL folder (never the hub), checking its layout first.

    Raises FileNotFoundError naming the path and the missing piece, ValueError for a folder diffusers
    cannot read.
    """
    path = Path(path)
    what = f"{pipeline_cls.__name__} folder {path}"
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no such directory (a local diffusers pipeline folder is required)")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{what}: missing model_index.json (not a diffusers pipeline folder)")
    for name in subfolders:
        if not (path / name).is_dir() or not any((path / name).iterdir()):
            raise FileNotFoundError(
                f"{what}: missing or empty subfolder {name!r} (needs {', '.join(subfolders)})"
            )
    if weights_dtype not in DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(DTYPES)}, got {weights_dtype!r}")
    try:
        pipe = pipeline_cls.from_pretrained(str(path), local_files_only=True, dtype=DTYPES[weights_dtype])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{what}: cannot load ({type(e).__name__}: {e})") from e
    if pipe.transformer.dtype != DTYPES[weights_dtype]:  # diffusers before `dtype=` ignores it
        raise ValueError(
            f"{what}: loaded as {pipe.transformer.dtype}, not {weights_dtype}; "
            "this diffusers version does not accept `dtype=` (0.42 is tested)"
        )
    return pipe


DECODE_BATCH = 8  # images per VAE decode call: a decoder's full-resolution activations are large


@torch.no_grad()
def vae_decode(vae: nn.Module, latents: Tensor) -> np.ndarray:
    """Scaled latents (B, C, h, w) -> uint8 images (B, H, W, 3) through the VAE (scaling, shift), DECODE_BATCH
    images at a time."""
    shift = vae.config.shift_factor or 0.0
    latents = latents / vae.config.scaling_factor + shift
    out = []
    for lo in range(0, latents.shape[0], DECODE_BATCH):
        chunk = latents[lo:lo + DECODE_BATCH].to(vae.device, vae.dtype)
        out.append(to_uint8_images(vae.decode(chunk, return_dict=False)[0]))  # (b, 3, H, W) in [-1, 1]
    return np.concatenate(out)


def release_pipeline_parts(policy, names: Sequence[str]) -> None:
    """Free a pipeline's frozen parts a role does not use (the learner: VAE and text encoders)."""
    for name in names:
        setattr(policy.pipe, name, None)
    policy.vae = None
    policy.inference_parts_released = True


def require_inference_parts(policy) -> None:
    if getattr(policy, "inference_parts_released", False):
        raise RuntimeError(f"this {policy.name} policy was loaded for the learner, without its VAE and text "
                           "encoders: encode and decode on a rollout worker (or load it with role='rollout')")


# ----------------------------------------------------------------------------- trainable-only checkpoints
TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE_META = "trainable.json"


def load_diffusers_policy(policy_cls, pipeline_cls: type, subfolders: Sequence[str], path: str | Path, *,
                          weights_dtype: str, trainable_from: str | Path | None, options: Mapping):
    """Shared `load` of the SD3 / FLUX backends: pipeline from a local folder, then optionally the trainable
    weights `save` wrote (`trainable_from`) in place of the initial adapter (or transformer)."""
    pipe = load_pipeline(pipeline_cls, path, subfolders, weights_dtype)
    policy = policy_cls(pipe, **options)
    policy.base_path = str(path)
    if trainable_from is not None:
        load_trainable(trainable_from, policy.trainable, policy_cls.name)
    return policy


def save_trainable(path: str | Path, trainable: TrainableTransformer, meta: Mapping[str, object]) -> None:
    """Write the trainable weights (LoRA adapter or full transformer) and what they fit onto."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(trainable.state_dict(), str(path / TRAINABLE_FILE))
    info = {**meta, "lora_rank": trainable.lora_rank, "lora_alpha": trainable.lora_alpha}
    (path / TRAINABLE_META).write_text(json.dumps(info, indent=2))


def load_trainable(path: str | Path, trainable: TrainableTransformer, backend: str) -> None:
    """Load what `save_trainable` wrote; clear errors for missing, corrupt or mismatched files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in (TRAINABLE_META, TRAINABLE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"trainable checkpoint {path}: missing {name}")
    try:
        info = json.loads((path / TRAINABLE_META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / TRAINABLE_META}: not valid JSON ({e})") from e
    if info.get("backend") != backend or info.get("lora_rank") != trainable.lora_rank:
        raise ValueError(
            f"{path}: saved for backend {info.get('backend')!r} with lora_rank {info.get('lora_rank')}, "
            f"loading into {backend!r} with lora_rank {trainable.lora_rank}"
        )
    try:
        state = load_file(str(path / TRAINABLE_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path / TRAINABLE_FILE}: unreadable safetensors file (truncated or corrupted?): {e}"
        ) from e
    try:
        trainable.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{path / TRAINABLE_FILE}: {e}") from e
