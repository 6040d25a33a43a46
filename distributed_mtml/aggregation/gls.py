"""GLS: the geometric mean of the task losses as the objective.

Reference: Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
Strategy for Multi-Task Learning", CVPR Workshops 2019. The gradient of (prod_j L_j)^(1/K) is
sum_i GL / (K L_i) grad L_i: task i's multiplier is GL / L_i (1 when the losses are equal), so a
task whose loss is small relative to the others gets a large weight, scale-free in each loss's
units. Needs every task's loss at each step (one all-reduce of K floats across workers).
"""

from __future__ import annotations

import torch

from distributed_mtml.aggregation.loss_weighting import StepWeighting

FLOOR = 1e-12  # a loss of exactly zero would have an infinite multiplier


class GeometricLossStrategy(StepWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None, **common):
        super().__init__(owned, order, types, **common)

    def suite_multipliers(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        every = self.suite_losses(losses).clamp_min(FLOOR)
        return torch.exp(torch.log(every).mean()) / every
