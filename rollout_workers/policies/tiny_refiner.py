"""The tiny policy's transformer with an optional pixel-scale refiner.

A patch-4 DiT predicts each 4x4 block of the velocity from one token through one linear layer, so edges that do
not fall on the patch grid come out ragged: a square drawn that way fills too little of its box to read as a
square (`services/shapes_world/pixels.py::_classify_shape` asks for 88 %). The refiner is a small residual
convolution stack at full resolution over [x_t, v, sigma],

    v' = v + refiner([x_t, v, sigma 1])        (3x3 convolutions, SiLU, the last one zero-initialised)

so a refiner added to a trained model leaves its velocity unchanged until it trains. `refiner_channels = 0` is
the plain `SD3Transformer2DModel` (the module, its state dict and its outputs are the parent's). Full fine-tuning
(lora_rank 0, the tiny default) trains it with the rest; a LoRA adapter targets attention projections only, so under
one the refiner stays frozen. About 12k parameters and 12 M multiply-adds per image at 32 channels (the patch-4
transformer: 2.3 M and about 60 M).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

REFINER_LAYERS = 3  # convolutions: in -> C, C -> C, C -> out; receptive field 7x7 pixels


class RefinedTransformer(SD3Transformer2DModel):
    """`SD3Transformer2DModel` plus `refiner` (present when refiner_channels > 0); same call signature."""

    @register_to_config
    def __init__(self, *, refiner_channels: int = 0, **sd3_config):
        super().__init__(**sd3_config)  # refiner_channels >= 0 is checked where it is configured, `TinyConfig`
        self.refiner = build_refiner(self.config.in_channels, self.out_channels, refiner_channels) \
            if refiner_channels else None

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor = None, pooled_projections: Tensor = None,
                timestep: Tensor = None, return_dict: bool = True, **kwargs):
        out = super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                              return_dict=False, **kwargs)[0]
        if self.refiner is not None:
            sigma = (timestep.to(out.dtype) / 1000.0).view(-1, 1, 1, 1).expand(-1, 1, *out.shape[2:])
            out = out + self.refiner(torch.cat([hidden_states.to(out.dtype), out, sigma], dim=1))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def build_refiner(in_channels: int, out_channels: int, channels: int) -> nn.Sequential:
    """[x_t, v, sigma] (in + out + 1 channels) -> a velocity correction; zero at initialisation."""
    layers: list[nn.Module] = []
    width = in_channels + out_channels + 1
    for _ in range(REFINER_LAYERS - 1):
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.SiLU()]
        width = channels
    last = nn.Conv2d(width, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)
