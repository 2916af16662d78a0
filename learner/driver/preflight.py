"""Memory preflight: each role's GPU memory, estimated from the model folder's configs before any actor starts.

    estimates = estimate_memory(cfg)      # [RoleMemory(role, capacity_gb, parts {name: GB}), ...]
    check_memory(cfg)                     # ConfigError naming the fields to change when a role cannot fit
    micro_batch_advice(cfg)               # a line when the learner's forward is too small for its GPU, or None

Parameter counts come from the configs in `model.path` (the modules are built on the `meta` device: no
weights are read or allocated). What each role holds (learner/driver/build.py):

- learner (per rank): the transformer (fp32 master weights when it trains fully; else in the inference dtype),
  what it trains in fp32 with its gradient and AdamW's two moments (16 bytes per trained parameter; 1/K of them
  on each of K ranks with `learner.sharding=fsdp`), a frozen reference copy for the KL at lora_rank 0, the
  iteration's window latents (fp32), and activations;
- rollout worker: every part (transformer, text encoders, VAE) in the inference dtype, a fp32 LoRA adapter,
  inference activations and the VAE decode;
- reward replica: the weight files in its `model_path`.

Activations, per transformer block (Korthikanti et al., 2022, with memory-efficient attention, i.e. without the
s² term): 34·s·b·h bytes in bf16 (twice that in fp32), s tokens, b rows, h hidden; with gradient checkpointing
2·s·b·h bytes per block plus one block's 34·s·b·h. b = micro_batch_size × window steps per backward (the
learner runs classifier-free guidance's negative branch without a graph; a rollout's b doubles with it: SD3,
tiny). Inference keeps about INFERENCE_LIVE_TENSORS such (s, b, h) tensors
alive. These are estimates, stated so: the check refuses only what is clearly too big, and reports the parts.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rollout_workers.policies.base import DEFAULT_LORA_TARGETS
from services.config import Config, ConfigError

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
TRAIN_BYTES_PER_ELEMENT = 34  # per (token, row, hidden unit) and block, bf16 (Korthikanti et al., 2022)
CHECKPOINT_BYTES_PER_ELEMENT = 2  # a checkpointed block keeps its bf16 input
INFERENCE_LIVE_TENSORS = 10  # (s, b, h) tensors alive at once in one block's forward without gradients
ROLLOUT_CHUNK_GROUPS = 4  # groups a rollout worker samples at once (RolloutWorker.chunk_groups)
DECODE_BATCH = 8  # images per VAE decode call (rollout_workers/policies/base.py `vae_decode`)
CUDA_OVERHEAD_GB = 1.0  # CUDA context and allocator slack per process
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}  # CLIP + T5 (SD3), T5 (FLUX): the backends' max_sequence_length


@dataclass
class RoleMemory:
    role: str
    capacity_gb: float | None  # None: a CPU role (not checked)
    parts: dict[str, float] = field(default_factory=dict)  # GB

    @property
    def total_gb(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity_gb is None or self.total_gb <= self.capacity_gb


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a model: parameter counts per part and the transformer's shape."""

    params: dict[str, int]  # "transformer", "vae", "text_encoder", …
    lora_params: int  # of a rank-1 adapter on DEFAULT_LORA_TARGETS (scales linearly with the rank)
    blocks: int
    hidden: int
    image_tokens: int
    text_tokens: int
    latent_numel: int  # C·h·w of one latent
    decode_channels: int  # the VAE decoder's widest full-resolution feature map (0: no VAE)
    pixels: int  # H·W


def _build_meta(library: str, class_name: str, folder: Path) -> nn.Module:
    """The module of `folder` (a diffusers or transformers config) on the meta device: shapes, no weights."""
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(str(folder)))
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(str(folder), local_files_only=True))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_rank1_params(transformer: nn.Module, targets=DEFAULT_LORA_TARGETS) -> int:
    """Parameters of a rank-1 LoRA adapter: in + out features of every targeted Linear."""
    return sum(m.in_features + m.out_features for name, m in transformer.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def diffusers_architecture(cfg: Config) -> Architecture:
    """Read `model.path`'s model_index.json and the configs it names (sd3 / flux)."""
    root = Path(cfg.model.path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"model.path {root}: no model_index.json (a diffusers pipeline folder is needed for the "
                          "memory preflight and the run)")
    index = json.loads(index_file.read_text())
    pipeline = index.get("_class_name", "")
    if (expected := {"sd3": "StableDiffusion3", "flux": "Flux"}.get(cfg.model.backend)) and pipeline:
        if not pipeline.startswith(expected):  # another family's folder: its parts are not this backend's
            other = next((b for b, name in (("sd3", "StableDiffusion3"), ("flux", "Flux")) if pipeline.startswith(name)),
                         None)
            raise ConfigError(f"model.path {root} holds a {pipeline} (model_index.json _class_name), "
                              f"not a {expected}Pipeline for model.backend={cfg.model.backend}"
                              + (f"; set model.backend={other}" if other else ""))
    params, transformer, vae = {}, None, None
    for part, spec in index.items():
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")):
            continue
        if part in ("scheduler",) or part.startswith("tokenizer"):
            continue
        module = _build_meta(spec[0], spec[1], root / part)
        params[part] = count(module)
        transformer = module if part == "transformer" else transformer
        vae = module if part == "vae" else vae
    if transformer is None:
        raise ConfigError(f"model.path {root}: model_index.json names no transformer")
    tc = transformer.config
    down = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    h_lat, w_lat = cfg.model.height // down, cfg.model.width // down
    patch = getattr(tc, "patch_size", 1) or 1
    check_image_size(cfg, down * (2 if cfg.model.backend == "flux" else patch), down)
    if cfg.model.backend == "flux" and not getattr(tc, "guidance_embeds", False) and cfg.model.guidance_scale != 1.0:
        raise ConfigError(f"model.guidance_scale={cfg.model.guidance_scale:g}: this FLUX transformer has no guidance "
                          f"embedding (FLUX.1-schnell-like); set model.guidance_scale=1")
    if cfg.model.backend == "flux" and getattr(tc, "guidance_embeds", False) and cfg.model.guidance_scale == 1.0:
        print("warning: model.guidance_scale=1 on a guidance-distilled FLUX (FLUX.1-dev-like): its embedding gets 1, "
              "where the reference samples with 3.5 (the flux_dev preset)", file=sys.stderr, flush=True)
    if cfg.model.backend == "flux":
        blocks, image_tokens = tc.num_layers + tc.num_single_layers, (h_lat // 2) * (w_lat // 2)
    else:
        blocks, image_tokens = tc.num_layers, (h_lat // patch) * (w_lat // patch)
    latent_channels = vae.config.latent_channels if vae is not None else tc.in_channels
    return Architecture(
        params=params, lora_params=lora_rank1_params(transformer), blocks=blocks,
        hidden=tc.num_attention_heads * tc.attention_head_dim, image_tokens=image_tokens,
        text_tokens=TEXT_TOKENS[cfg.model.backend], latent_numel=latent_channels * h_lat * w_lat,
        decode_channels=vae.config.block_out_channels[0] if vae is not None else 0,
        pixels=cfg.model.height * cfg.model.width)


def check_image_size(cfg: Config, factor: int, down: int) -> None:
    """model.height and model.width must be multiples of the VAE's downsampling times the transformer's patch (FLUX:
    its 2×2 packing), as the policies require: said before Ray starts, not from inside a rollout actor."""
    h, w = cfg.model.height, cfg.model.width
    if h % factor or w % factor:
        near = lambda v: max(factor, round(v / factor) * factor)  # noqa: E731
        raise ConfigError(f"model.height/model.width {h}x{w}: must be multiples of {factor} for this "
                          f"{cfg.model.backend} model (VAE ×{down}, times its {factor // down}×{factor // down} "
                          f"patches), e.g. {near(h)}x{near(w)}")


def tiny_architecture(cfg: Config) -> Architecture:
    from learner.driver.build import TINY_CHECKPOINT
    from rollout_workers.policies.tiny import build_modules, config_from_architecture, read_config

    path = Path(cfg.model.path or TINY_CHECKPOINT)
    config = config_from_architecture(read_config(path)["architecture"], path)
    with torch.device("meta"):
        transformer, text_encoder = build_modules(config)
    tc = transformer.config
    side = config.sample_size // config.patch_size
    return Architecture(
        params={"transformer": count(transformer), "text_encoder": count(text_encoder)},
        lora_params=lora_rank1_params(transformer), blocks=tc.num_layers,
        hidden=tc.num_attention_heads * tc.attention_head_dim, image_tokens=side * side,
        text_tokens=config.max_length, latent_numel=3 * config.sample_size ** 2, decode_channels=0,
        pixels=config.sample_size ** 2)


def activation_gb(arch: Architecture, rows: int, *, checkpointing: bool, bf16: bool) -> float:
    """Training activations of `rows` rows through every block (see the module docstring)."""
    unit = (arch.image_tokens + arch.text_tokens) * rows * arch.hidden * (1 if bf16 else 2)
    if checkpointing:
        return (CHECKPOINT_BYTES_PER_ELEMENT * arch.blocks + TRAIN_BYTES_PER_ELEMENT) * unit / GB
    return TRAIN_BYTES_PER_ELEMENT * arch.blocks * unit / GB


def _capacity(cfg: Config, num_gpus: float, device_auto_gpu: bool) -> float | None:
    if not device_auto_gpu:
        return None
    return cfg.cluster.gpu_memory_gb * min(num_gpus, 1.0)


def trained_transitions(cfg: Config) -> int:
    """Window transitions each row trains: the window's size, or one when the sampler branches (TempFlow, G²RPO)."""
    return cfg.window.size if cfg.sampler.branching == "none" else 1


def steps_per_forward(cfg: Config) -> int:
    """Window steps the learner stacks into one forward of a micro-batch (`learner.timesteps_per_backward`, 0: all)."""
    window = trained_transitions(cfg)
    return min(cfg.learner.timesteps_per_backward or window, window)


def estimate_memory(cfg: Config, arch: Architecture | None = None) -> list[RoleMemory]:
    """Every role's estimate (GB) against the memory of the GPU it asks for (None for a CPU role)."""
    from learner.driver.build import inference_dtype

    arch = arch or (tiny_architecture(cfg) if cfg.model.backend == "tiny" else diffusers_architecture(cfg))
    m, lc = cfg.model, cfg.learner
    on_gpu = {role: m.device == "cuda" or (m.device == "auto" and n > 0)
              for role, n in (("rollout", cfg.rollout.num_gpus), ("learner", lc.num_gpus))}
    cfg_rows = 2 if (m.backend in ("sd3", "tiny") and m.guidance_scale > 1.0) else 1
    transformer = arch.params["transformer"]
    frozen_parts = {k: v for k, v in arch.params.items() if k != "transformer"}

    # learner
    dtype = DTYPE_BYTES[inference_dtype(m, torch.device("cuda" if on_gpu["learner"] else "cpu"))]
    trained = transformer if m.lora_rank == 0 else arch.lora_params * m.lora_rank
    shards = lc.num_workers if lc.sharding == "fsdp" else 1  # FSDP: 1/K of the transformer's states per rank
    trained //= shards
    learner = RoleMemory("learner rank" if lc.num_workers > 1 else "learner",
                         _capacity(cfg, lc.num_gpus, on_gpu["learner"]))
    learner.parts["transformer weights"] = transformer // shards * (4 if m.lora_rank == 0 else dtype) / GB
    if m.lora_rank:
        learner.parts["LoRA adapter (fp32)"] = trained * 4 / GB
    learner.parts["gradients (fp32)"] = trained * 4 / GB
    learner.parts["AdamW moments (fp32)"] = trained * 8 / GB
    if cfg.grpo.kl_beta > 0 and m.lora_rank == 0:
        learner.parts["KL reference copy (fp32)"] = transformer * 4 / GB
    window = trained_transitions(cfg)
    learner.parts["window latents (fp32)"] = cfg.rollout.batch_size * window * arch.latent_numel * 4 * 2 / GB
    learner.parts["activations"] = activation_gb(arch, lc.micro_batch_size * steps_per_forward(cfg),
                                                 checkpointing=m.gradient_checkpointing, bf16=m.autocast_bf16)

    # rollout worker
    rdtype = DTYPE_BYTES[inference_dtype(m, torch.device("cuda" if on_gpu["rollout"] else "cpu"))]
    rollout = RoleMemory("rollout worker", _capacity(cfg, cfg.rollout.num_gpus, on_gpu["rollout"]))
    rollout.parts["transformer weights"] = transformer * rdtype / GB
    rollout.parts["text encoders, VAE"] = sum(frozen_parts.values()) * rdtype / GB
    if m.lora_rank:
        rollout.parts["LoRA adapter (fp32)"] = arch.lora_params * m.lora_rank * 4 / GB
    rows = ROLLOUT_CHUNK_GROUPS * cfg.grpo.group_size * cfg_rows
    rollout.parts["activations"] = (INFERENCE_LIVE_TENSORS * (arch.image_tokens + arch.text_tokens) * rows
                                    * arch.hidden * rdtype / GB)
    if arch.decode_channels:
        rollout.parts["VAE decode"] = DECODE_BATCH * arch.decode_channels * arch.pixels * rdtype * 6 / GB

    out = [learner, rollout]
    for spec in cfg.reward.rewards:
        size = sum(f.stat().st_size for f in Path(spec.model_path).rglob("*")
                   if f.suffix in (".safetensors", ".bin", ".pt", ".pth")) if spec.model_path and \
            Path(spec.model_path).is_dir() else 0
        out.append(RoleMemory(f"reward {spec.name}", cfg.cluster.gpu_memory_gb * spec.num_gpus if spec.num_gpus
                              else None, {"weights": size / GB}))
    for r in out:
        if r.capacity_gb is not None:
            r.parts["CUDA context"] = CUDA_OVERHEAD_GB
    return out


ADVICE = {
    "transformer weights": "model.lora_rank > 0 (train a LoRA adapter over bf16 weights instead of the whole "
                           "transformer in fp32), or shard it: learner.num_workers > 1 with learner.sharding=fsdp",
    "gradients (fp32)": "model.lora_rank > 0",
    "AdamW moments (fp32)": "model.lora_rank > 0",
    "KL reference copy (fp32)": "grpo.kl_beta=0 or model.lora_rank > 0 (the reference is then the adapter off)",
    "activations": "model.gradient_checkpointing=true, learner.timesteps_per_backward=1, a smaller "
                   "learner.micro_batch_size (or rollout: a smaller grpo.group_size)",
    "window latents (fp32)": "a smaller rollout.batch_size",
    "text encoders, VAE": "model.weights_dtype=bfloat16",
    "VAE decode": "smaller model.height / model.width",
    "weights": "num_gpus of this reward (a whole GPU)",
}
_WHOLE_MODEL = ("model.weights_dtype=bfloat16 if it is float32, or GPUs with more memory: a rollout worker holds the "
                "whole model for inference (LoRA and learner sharding do not shrink it)")
ROLLOUT_ADVICE = {"transformer weights": _WHOLE_MODEL, "text encoders, VAE": _WHOLE_MODEL,
                  "activations": "a smaller grpo.group_size (a worker samples 4 groups at once)"}


def table(estimates: list[RoleMemory]) -> str:
    lines = ["| role | estimate (GB) | device (GB) | largest parts |", "|---|---:|---:|---|"]
    for r in estimates:
        big = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.parts.items(), key=lambda kv: -kv[1])[:3])
        cap = "CPU" if r.capacity_gb is None else f"{r.capacity_gb:.0f}"
        lines.append(f"| {r.role} | {r.total_gb:.1f} | {cap} | {big} |")
    return "\n".join(lines)


def check_memory(cfg: Config, arch: Architecture | None = None) -> list[RoleMemory]:
    """`estimate_memory`, raising ConfigError for every GPU role that cannot fit, with the fields to change."""
    estimates = estimate_memory(cfg, arch)
    problems = []
    for r in estimates:
        if r.fits:
            continue
        worst = sorted(r.parts.items(), key=lambda kv: -kv[1])[:2]
        hints = {**ADVICE, **ROLLOUT_ADVICE} if r.role == "rollout worker" else ADVICE
        advice = "; ".join(dict.fromkeys(hints[k] for k, _ in worst if k in hints))
        problems.append(f"{r.role} needs ~{r.total_gb:.0f} GB ("
                        + ", ".join(f"{k} {v:.1f}" for k, v in worst) + f") on a {r.capacity_gb:.0f} GB GPU "
                        f"(cluster.gpu_memory_gb): change {advice}")
    if problems:
        raise ConfigError("memory preflight: " + "\n  ".join(problems) + "\n\n" + table(estimates))
    return estimates


# Tokens per learner forward that keep one H200 busy. SD3.5-Medium's learner step under CFG (24 blocks at 512 px,
# 1,357 tokens a row, every weight's gradient: benchmarks/cfg_backward.py) cost per sample 0.112 s at 3 samples (4 k
# tokens), 0.062 s at 6 (8 k) and 0.056 s at 12 (16 k): benchmarks/README.md, 4 December.
BUSY_TOKENS = 16_000
UNDERFED_TOKENS = BUSY_TOKENS // 2


def learner_forward_tokens(cfg: Config, arch: Architecture, micro_batch: int | None = None) -> int:
    """Tokens in one learner forward: micro-batch × the window steps per forward (the rows `estimate_memory` counts
    activations for) × (image + text) tokens a row."""
    return (micro_batch or cfg.learner.micro_batch_size) * steps_per_forward(cfg) * (arch.image_tokens + arch.text_tokens)


def suggested_micro_batch(cfg: Config, arch: Architecture | None = None) -> int | None:
    """A `learner.micro_batch_size` for a learner on a GPU: the smallest whose forward holds BUSY_TOKENS tokens, or
    else the largest that fits, among those whose learner estimate fits the GPU and that keep the samples per
    optimizer step (micro-batch × accumulation, with the accumulation a multiple of the learner's ranks, which
    each step's micro-batches are dealt across). None for a learner on the CPU, or when none fits."""
    arch = arch or (tiny_architecture(cfg) if cfg.model.backend == "tiny" else diffusers_architecture(cfg))
    lc = cfg.learner
    if estimate_memory(cfg, arch)[0].capacity_gb is None:
        return None
    per_step = lc.micro_batch_size * lc.gradient_accumulation_steps
    fitting = []
    for micro in (d for d in range(1, per_step + 1) if per_step % d == 0 and (per_step // d) % lc.num_workers == 0):
        trial = cfg.model_copy(deep=True)
        trial.learner.micro_batch_size, trial.learner.gradient_accumulation_steps = micro, per_step // micro
        if estimate_memory(trial, arch)[0].fits:
            fitting.append(micro)
    busy = [m for m in fitting if learner_forward_tokens(cfg, arch, m) >= BUSY_TOKENS]
    return busy[0] if busy else (fitting[-1] if fitting else None)


def micro_batch_advice(cfg: Config, arch: Architecture | None = None) -> str | None:
    """A line for the run's output when the learner's forward holds under UNDERFED_TOKENS tokens on a GPU that
    would take a larger micro-batch (the same samples per optimizer step); an estimate, so a suggestion, never a
    change. Else None; always None for the tiny model, whose rows are too small for the measurement to apply."""
    if cfg.model.backend == "tiny":
        return None
    arch = arch or diffusers_architecture(cfg)
    lc = cfg.learner
    tokens = learner_forward_tokens(cfg, arch)
    suggestion = suggested_micro_batch(cfg, arch) if tokens < UNDERFED_TOKENS else None
    if suggestion is None or suggestion <= lc.micro_batch_size:
        return None
    per_step = lc.micro_batch_size * lc.gradient_accumulation_steps
    return (f"learner: micro-batch {lc.micro_batch_size} runs {tokens:,} tokens per forward, too few to keep a GPU "
            f"busy; learner.micro_batch_size={suggestion} learner.gradient_accumulation_steps={per_step // suggestion} "
            f"fits by the estimate and keeps {per_step} samples per optimizer step (on one H200, SD3.5-Medium's "
            f"update ran 3.1x faster at 12 samples than at 3)")
