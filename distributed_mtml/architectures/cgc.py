"""`cgc`: Customized Gate Control, one level of Progressive Layered Extraction (Tang et al.,
"Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
Recommendations", RecSys 2020).

The shared experts of `mmoe` (`model.experts`, on every worker), and `model.task_experts`
experts of each task's own, in its module on its owner; the task's gate weighs its own experts
and the shared ones together. A task can keep what conflicts with the others in its own experts
instead of pulling the shared ones apart (the "seesaw" the article measured with MMoE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.architectures.mmoe import Gate, experts

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


class OwnAndShared(nn.Module):
    """A task's own experts beside the shared ones, under one gate over all of them."""

    def __init__(self, cfg: ModelConfig, in_width: int):
        super().__init__()
        self.own = experts(cfg, in_width, cfg.task_experts)
        self.gate = Gate(in_width, cfg.experts + cfg.task_experts, cfg.trunk.widths[-1], cfg.trunk.passthrough)

    def forward(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        return self.gate.mixed(inputs, torch.cat([shared_output, self.own(inputs)], -1))

    def shared_weights(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        """What the task draws from each shared expert, then from its own experts together,
        [rows, shared experts + 1]: the own experts are no other task's, so they are one column."""
        return self.gate.with_own_column(inputs, len(self.own.experts))


def task_part(cfg: ModelConfig, in_width: int, index: int, tasks: int) -> OwnAndShared:
    return OwnAndShared(cfg, in_width)


def new_task_part(known: list[OwnAndShared]) -> Gate:
    """A task the model was not trained on has no experts of its own: it reads the shared ones,
    weighed by the known tasks' gates' rows for them, averaged."""
    first = known[0].gate
    return Gate.averaged([k.gate for k in known], first.count - len(known[0].own.experts), first.passthrough)
