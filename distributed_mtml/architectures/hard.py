"""`hard`: one trunk, the same for every task (hard parameter sharing, Caruana 1997)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.layers import mlp, with_input

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


class PassthroughTrunk(nn.Sequential):
    """The trunk's layers, with its input next to their output (`model.trunk.passthrough`). A
    Sequential of the same layers, so its state dict and layer list are a plain trunk's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_input(super().forward(x), x, True)

    @property
    def passes_input(self) -> int:
        """How many of its output's columns (the last ones) are its input."""
        return self[0].in_features


def shared(cfg: ModelConfig, in_width: int, tasks: int) -> nn.Sequential:
    layers = mlp(in_width, cfg.trunk.widths, cfg.trunk)
    return PassthroughTrunk(*layers) if cfg.trunk.passthrough else layers
