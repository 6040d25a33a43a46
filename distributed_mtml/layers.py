"""The one block every network part here is made of: Linear layers with norm, activation and
dropout. Its own module so that the trunk (`models`) and the heads (`heads/`) both build from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from distributed_mtml.config import TrunkConfig


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(in_width: int, widths: list[int], cfg: TrunkConfig) -> nn.Sequential:
    """Linear layers of `widths`, each followed by norm, activation and dropout (from `cfg`)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Linear(in_width, width))
        if cfg.layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        in_width = width
    return nn.Sequential(*layers)


def with_input(features: torch.Tensor, inputs: torch.Tensor, passthrough: bool) -> torch.Tensor:
    """What a head reads: `features`, then the input itself where `model.trunk.passthrough` is on."""
    return torch.cat([features, inputs.to(features.dtype)], -1) if passthrough else features
