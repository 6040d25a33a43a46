"""`separate`: one head per task, fitted from its own rows only (no sharing)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.layers import mlp

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


def stack(in_width: int, out_width: int, cfg: ModelConfig) -> nn.Sequential:
    """A head's layers: `model.head_hidden` (norm, activation, dropout as the trunk's), then a
    linear map to the output. What every kind builds, per task or shared."""
    last = cfg.head_hidden[-1] if cfg.head_hidden else in_width
    return nn.Sequential(mlp(in_width, cfg.head_hidden, cfg.trunk), nn.Linear(last, out_width))


class SeparateHead(nn.Sequential):
    """The layers of `stack`, as the task's own parameters (the state-dict keys of every model
    saved before head kinds existed)."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def standalone(self) -> nn.Module:
        return copy.deepcopy(self)


def task_head(out_width: int, cfg: ModelConfig, trunk_out: int, shared: nn.Module | None, rows: int) -> nn.Module:
    return SeparateHead(*stack(trunk_out, out_width, cfg))
