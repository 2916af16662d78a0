"""The built-in tiny policy: a diffusers SD3 MM-DiT in pixel space for the 32x32 shapes world.

    policy = TinyPolicy.from_config(TinyConfig.for_shapes_world(), seed=0)   # random init
    policy = TinyPolicy.load("checkpoints/tiny")                              # config.json, model.safetensors
    cond = policy.encode_prompts(["one red circle"])                          # encoder_hidden_states, pooled
    v = policy.velocity(x, sigma, cond)                                       # x (B, 3, 32, 32), sigma (B,)

Pieces: an offline word-level tokenizer (`tokenizers`, lower-cased, [BOS] words [EOS] padded to a fixed
length; unknown words and over-long prompts are errors, the world is closed), a small `CLIPTextModel`
(last hidden state -> joint attention, EOS-pooled output -> pooled projection) and an
`SD3Transformer2DModel` with patch 4 over x in [-1, 1] (with `refiner_channels` > 0 plus a pixel-scale convolution
refiner, `tiny_refiner`). The transformer is conditioned on
timestep = 1000 * sigma, the diffusers FlowMatch convention. With guidance_scale > 1 the velocity is
classifier-free guided as SD3's is, v = v_neg + s (v_pos - v_neg), the negative prompt the empty one ("",
[BOS][EOS]): a base pre-trained with prompt dropout (`pretrain policy --p-uncond`) has learned it. The
text encoder is always frozen; the transformer trains fully (lora_rank 0) or through a LoRA adapter on its attention projections.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from .base import (
    DEFAULT_LORA_TARGETS,
    DTYPES,
    Cond,
    cfg_scale,
    check_state_dict,
    check_velocity_inputs,
    sd3_transformer_velocity,
    to_uint8_images,
)
from .tiny_refiner import RefinedTransformer
from .trainable import TrainableTransformer, TransformerPolicy

FORMAT = "mixgrpo-ray/tiny-policy"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0, 1, 2, 3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny policy; written to config.json with the weights."""

    vocab: tuple[str, ...]  # prompt words, without the special tokens
    max_length: int = 12  # tokens per prompt including [BOS] and [EOS]
    sample_size: int = 32  # image height = width, in pixels
    patch_size: int = 4
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32  # transformer width = heads * head_dim = 128
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 256
    refiner_channels: int = 32  # > 0: a pixel-scale convolution refiner on the velocity (`tiny_refiner`)

    def __post_init__(self) -> None:
        words = [w.lower() for w in self.vocab]
        if not words or len(set(words)) != len(words) or set(words) & {t.lower() for t in SPECIAL_TOKENS}:
            raise ValueError(
                "TinyConfig.vocab must be non-empty, unique after lower-casing and without special tokens"
            )
        if not all(w.isalnum() for w in words):  # the pre-tokenizer splits on whitespace and punctuation
            raise ValueError("TinyConfig.vocab entries must be single alphanumeric words")
        if self.sample_size % self.patch_size or self.max_length < 3:
            raise ValueError("sample_size must be a multiple of patch_size and max_length >= 3")
        if self.refiner_channels < 0:
            raise ValueError(f"refiner_channels must be >= 0, got {self.refiner_channels}")
        object.__setattr__(self, "vocab", tuple(words))

    @classmethod
    def for_shapes_world(cls, **sizes: int) -> TinyConfig:
        """The vocabulary of `services.shapes_world` (imported here, not at module load)."""
        from services.shapes_world import VOCABULARY

        return cls(vocab=tuple(VOCABULARY), **sizes)


def build_tokenizer(vocab: Sequence[str], max_length: int) -> Tokenizer:
    """Word-level tokenizer: lower-case, split on whitespace/punctuation, [BOS] ... [EOS], padded."""
    ids = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *vocab))}
    tokenizer = Tokenizer(models.WordLevel(vocab=ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=max_length)
    return tokenizer


def build_modules(config: TinyConfig) -> tuple[RefinedTransformer, CLIPTextModel]:
    """Randomly initialised (from torch's global RNG) transformer and text encoder."""
    text_config = CLIPTextConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(config.vocab),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # pooled = first [EOS] position
        attention_dropout=0.0,
    )
    transformer = RefinedTransformer(
        refiner_channels=config.refiner_channels,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        joint_attention_dim=config.text_hidden_size,
        caption_projection_dim=config.num_attention_heads * config.attention_head_dim,
        pooled_projection_dim=config.text_hidden_size,
        pos_embed_max_size=config.sample_size // config.patch_size,
    )
    return transformer, CLIPTextModel(text_config)


class TinyPolicy(TransformerPolicy):
    """Pixel-space policy; x (B, 3, 32, 32) in [-1, 1]. Satisfies `base.Policy`."""

    name = "tiny"

    def __init__(
        self,
        config: TinyConfig,
        transformer: RefinedTransformer,
        text_encoder: CLIPTextModel,
        *,
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        autocast_bf16: bool = False,
        gradient_checkpointing: bool = False,
        guidance_scale: float = 1.0,
    ):
        self.guidance_scale = cfg_scale(guidance_scale)
        self.config = config
        self.latent_shape = (3, config.sample_size, config.sample_size)
        self.tokenizer = build_tokenizer(config.vocab, config.max_length)
        self.transformer = transformer.eval()  # modules stay in eval: velocity is deterministic
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.trainable = TrainableTransformer(
            transformer, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets
        )
        self.autocast_bf16 = autocast_bf16
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.device = torch.device("cpu")
        self._empty_states: tuple[Tensor, Tensor] | None = None  # the empty prompt's, for guidance
        self.training = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(cls, config: TinyConfig, seed: int = 0, **options) -> TinyPolicy:
        """A randomly initialised policy; the same (config, seed) gives the same weights everywhere."""
        _check_options(config, options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer, text_encoder = build_modules(config)
        return cls(config, transformer, text_encoder, **options)

    def with_refiner(self, channels: int, seed: int = 0) -> TinyPolicy:
        """A full-weight copy of this policy with a fresh, zero-output refiner of `channels` (its velocity is this
        one's until the refiner trains); for `pretrain policy --init ... --refiner-channels`."""
        if self.config.refiner_channels or self.trainable.lora_rank:
            raise ValueError("with_refiner grows a refiner on a full-weight policy that has none")
        config = dataclasses.replace(self.config, refiner_channels=channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer, text_encoder = build_modules(config)
        missing, unexpected = transformer.load_state_dict(self.transformer.state_dict(), strict=False)
        if unexpected or not all(k.startswith("refiner.") for k in missing):
            raise ValueError(f"with_refiner: weights do not match (missing {missing}, unexpected {unexpected})")
        text_encoder.load_state_dict(self.text_encoder.state_dict())
        return TinyPolicy(config, transformer, text_encoder, guidance_scale=self.guidance_scale)

    def set_weights_dtype(self, dtype: str | torch.dtype) -> TinyPolicy:
        """Hold the text encoder and the transformer in `dtype` ("float32" / "bfloat16"); a LoRA adapter stays fp32."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.text_encoder.to(dtype)
        self.trainable.set_dtype(dtype)
        return self

    @classmethod
    def load(cls, path: str | Path, *, weights_dtype: str = "float32", **options) -> TinyPolicy:
        """Load `path/config.json` + `path/model.safetensors` (as written by `save`).

        A checkpoint saved with a LoRA adapter is rebuilt with it (`lora_rank` must then be 0 or the saved
        rank); a full checkpoint loaded with lora_rank > 0 gets a fresh adapter over its weights.
        """
        path = Path(path)
        meta = read_config(path)
        config = config_from_architecture(meta["architecture"], path)
        _check_options(config, options)
        saved_lora = meta.get("lora")
        if saved_lora and options.get("lora_rank", 0) not in (0, saved_lora["rank"]):
            raise ValueError(
                f"{path}: checkpoint has a rank-{saved_lora['rank']} LoRA adapter, "
                f"lora_rank={options['lora_rank']} requested"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer, text_encoder = build_modules(config)
        if saved_lora:
            options = {
                **options,
                "lora_rank": saved_lora["rank"],
                "lora_alpha": saved_lora["alpha"],
                "lora_targets": tuple(saved_lora["targets"]),
            }
            policy = cls(config, transformer, text_encoder, **options)
            _load_weights(path, policy.transformer, policy.text_encoder)
            return policy.set_weights_dtype(weights_dtype)
        _load_weights(path, transformer, text_encoder)
        return cls(config, transformer, text_encoder, **options).set_weights_dtype(weights_dtype)

    def save(self, path: str | Path) -> None:
        """Write `config.json` (architecture, vocabulary, LoRA shape, format version), `model.safetensors`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lora = None
        if self.trainable.lora_rank:
            targets = sorted(self.transformer.peft_config["default"].target_modules)
            lora = {"rank": self.trainable.lora_rank, "alpha": self.trainable.lora_alpha, "targets": targets}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": dataclasses.asdict(self.config),
            "lora": lora,
        }
        tensors = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    # ------------------------------------------------------------------ the policy protocol
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """prompts -> token ids (B, max_length); unknown words and over-long prompts raise ValueError."""
        if isinstance(prompts, str):
            raise TypeError("encode a list of prompts, not a single string")
        encodings = self.tokenizer.encode_batch(list(prompts))
        for prompt, enc in zip(prompts, encodings, strict=True):
            if len(enc.ids) > self.config.max_length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(enc.ids) - 2} words; at most "
                    f"{self.config.max_length - 2} fit the tiny policy's tokenizer"
                )
            unknown = [prompt[a:b] for (a, b), i in zip(enc.offsets, enc.ids, strict=True) if i == UNK_ID]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r} has words outside the tiny policy's vocabulary: {unknown}"
                )
        return torch.tensor([enc.ids for enc in encodings], dtype=torch.long)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """-> {"encoder_hidden_states": (B, L, D_text), "pooled_projections": (B, D_text)}, fp32; with guidance
        also "negative_encoder_hidden_states", "negative_pooled_projections": the empty prompt's, (B, ...)."""
        out = self.text_encoder(input_ids=self.tokenize(prompts).to(self.device))
        cond = {"encoder_hidden_states": out.last_hidden_state.float(), "pooled_projections": out.pooler_output.float()}
        if self.cfg:
            hidden, pooled = self._empty_prompt_states()
            b = len(cond["pooled_projections"])
            cond |= {"negative_encoder_hidden_states": hidden.expand(b, -1, -1).clone(),
                     "negative_pooled_projections": pooled.expand(b, -1).clone()}
        return cond

    @torch.no_grad()
    def _empty_prompt_states(self) -> tuple[Tensor, Tensor]:
        """The empty prompt's (1, L, D) and (1, D) states, encoded once: the text encoder never trains (`to` drops
        them with the device)."""
        if self._empty_states is None:
            out = self.text_encoder(input_ids=self.tokenize([""]).to(self.device))
            self._empty_states = (out.last_hidden_state.float(), out.pooler_output.float())
        return self._empty_states

    def _forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """x (B, 3, H, W), sigma (B,) in [0, 1] -> v (B, 3, H, W) fp32 (`sd3_transformer_velocity`)."""
        check_velocity_inputs(x, sigma, cond, self.latent_shape)
        return sd3_transformer_velocity(transformer, x, sigma, cond, device=self.device,
                                        guidance_scale=self.guidance_scale, autocast_bf16=self.autocast_bf16)

    def decode(self, x: Tensor) -> np.ndarray:
        """x (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
        return to_uint8_images(x)

    def to(self, device: str | torch.device) -> TinyPolicy:
        self.device = torch.device(device)
        self._empty_states = None
        self.transformer.to(self.device)
        self.text_encoder.to(self.device)
        self.trainable.to(self.device)
        return self

    def release_inference_parts(self) -> None:
        """Nothing to drop: the tiny text encoder is a few hundred kB and decoding is a rescale."""

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {
            "transformer": count(self.transformer),
            "text_encoder": count(self.text_encoder),
            "trainable": trainable,
        }


# ---------------------------------------------------------------------- checkpoint files
def read_config(path: Path) -> dict:
    """Read and check `path/config.json`; FileNotFoundError / ValueError name the path and the problem."""
    if not path.is_dir():
        raise FileNotFoundError(f"tiny policy checkpoint {path}: no such directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"tiny policy checkpoint {path}: missing {name}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: not a tiny policy config (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / CONFIG_FILE}: format_version {meta.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("architecture"), dict):
        raise ValueError(f"{path / CONFIG_FILE}: missing 'architecture'")
    return meta


def config_from_architecture(arch: dict, path: Path) -> TinyConfig:
    """config.json's "architecture" -> TinyConfig. A checkpoint written before the refiner existed has no
    "refiner_channels" key and no refiner: 0, not the current default."""
    try:
        return TinyConfig(**{"refiner_channels": 0, **arch, "vocab": tuple(arch["vocab"])})
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: bad 'architecture' ({e})") from e


def _load_weights(path: Path, transformer: nn.Module, text_encoder: nn.Module) -> None:
    file = path / WEIGHTS_FILE
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupted?): {e}") from e
    expected = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    expected |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    check_state_dict(tensors, expected, str(file))
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True
        )


def _check_options(config: TinyConfig, options: dict) -> None:
    """The run config passes the same options to every backend; the tiny one fixes the image size."""
    size = config.sample_size
    for key in ("height", "width"):
        if options.pop(key, size) != size:
            raise ValueError(f"the tiny policy generates {size}x{size} images; {key} must be {size}")
