"""Which weights of a backend's transformer train, and what every backend does the same way around its own forward.

`TrainableTransformer` holds the choice (all weights, or a peft LoRA adapter) and the reference policy;
`TransformerPolicy` gives the backends their shared velocity, reference velocity and trainable-weight methods.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Self

import torch
from torch import Tensor, nn

from .base import DEFAULT_LORA_TARGETS, Cond, check_state_dict, cpu_copy


# ----------------------------------------------------------------------------- trainable transformer
class TrainableTransformer:
    """Which weights of a diffusers transformer train: all of them (lora_rank 0) or a peft LoRA adapter.

    Composition helper for the backends (not a base class). With LoRA the base weights are frozen and the
    adapter (fp32, dropout 0) is what `state_dict()` returns, through peft's own (de)serialisers.
    The adapter is initialised from `seed` (B = 0, so it starts as the identity), so every process
    that loads the same checkpoint with the same options starts from the same weights.
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        lora_rank: int,
        lora_alpha: float = 0.0,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        seed: int = 0,
    ):
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.transformer = transformer
        self._reference: nn.Module | None = None
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha) if lora_alpha > 0 else float(lora_rank)
        transformer.requires_grad_(lora_rank == 0)
        if lora_rank > 0:
            from peft import LoraConfig

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=self.lora_alpha,
                lora_dropout=0.0,
                init_lora_weights=True,
                target_modules=list(lora_targets),
            )
            with torch.random.fork_rng(devices=[]):  # adapters are added on CPU, before `.to(device)`
                torch.manual_seed(seed)
                transformer.add_adapter(config)  # diffusers PeftAdapterMixin: adapter "default"
            for p in self.parameters():
                p.data = p.data.float()  # fp32 adapter even over bf16 base weights

    def keep_reference(self) -> None:
        """Keep the starting weights for `reference()`: nothing to keep with LoRA (the adapter is switched off);
        a frozen copy of the transformer otherwise (one more transformer in memory, on its device and dtype)."""
        if self.lora_rank == 0 and self._reference is None:
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy's transformer: this one with its adapter disabled, or the frozen copy."""
        if self.lora_rank > 0:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
            return
        if self._reference is None:
            raise RuntimeError("no reference weights kept: call keep_reference() before training starts")
        yield self._reference

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Hold the transformer in `dtype`; a LoRA adapter stays fp32 (fp32 master weights of what trains)."""
        nn.Module.to(self.transformer, dtype)  # (diffusers' own `to` warns about modules it would keep fp32)
        if self.lora_rank > 0:
            for p in self.parameters():
                p.data = p.data.float()

    def to(self, device: torch.device) -> None:
        """Move the frozen reference copy along with the policy (the transformer moves with its pipeline)."""
        if self._reference is not None:
            self._reference.to(device)

    def parameters(self) -> list[nn.Parameter]:
        if self.lora_rank == 0:
            return list(self.transformer.parameters())
        return [p for n, p in self.transformer.named_parameters() if "lora_" in n]

    def _live_state(self) -> dict[str, Tensor]:
        """The trainable tensors themselves (no copies), under the names `state_dict` uses."""
        if self.lora_rank == 0:
            return dict(self.transformer.named_parameters())
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def state_dict(self) -> dict[str, Tensor]:
        return cpu_copy(self._live_state())

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_dict(state, self._live_state(), "trainable state dict")
        if self.lora_rank == 0:
            for name, p in self.transformer.named_parameters():
                p.copy_(state[name])
            return
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.transformer, dict(state))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA state dict: peft rejected keys {result.unexpected_keys[:3]}")


class TransformerPolicy:
    """What every backend does the same way around its own `_forward(transformer, x, sigma, cond)`: the velocity of
    the live transformer, the reference velocity (`TrainableTransformer.reference`), and the trainable weights
    through `self.trainable`. A backend sets `self.transformer`, `self.trainable` and `self.training`."""

    transformer: nn.Module
    trainable: TrainableTransformer

    def _forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """The backend's forward pass of `transformer` (the live one or the reference): each backend defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define _forward(transformer, x, sigma, cond)")

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """x (B, C, H, W), sigma (B,) fp32 in [0, 1] -> velocity (B, C, H, W) fp32 (the backend's `_forward`)."""
        return self._forward(self.transformer, x, sigma, cond)

    @torch.no_grad()
    def reference_velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """The starting model's velocity: the adapter off, or the copy `keep_reference` made."""
        with self.trainable.reference() as transformer:
            return self._forward(transformer, x, sigma, cond)

    def keep_reference(self) -> None:
        self.trainable.keep_reference()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.trainable.parameters()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The LoRA adapter (peft key names), or all transformer weights at rank 0, as CPU copies."""
        return self.trainable.state_dict()

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.trainable.load_state_dict(state)

    def train(self, mode: bool = True) -> Self:
        """Records the mode only: modules stay in eval so rollout and learner compute the same velocity."""
        self.training = mode
        return self
