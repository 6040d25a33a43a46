"""DB-MTL: dual balancing, of the losses' scales (log losses) and of the gradients' sizes.

Reference: Lin et al., "Dual-Balancing for Multi-Task Learning", 2023. Each loss is taken as
log L_i (scale balancing), and each task's gradient of log L_i is scaled to the largest such
gradient among the tasks (magnitude balancing), with the sizes averaged over steps (an EMA of
rate `db_beta`).

As a loss weighting on the DDP path (no task gradients exchanged), the sizes are measured at the
last shared layer (`shared_layer`): n_i = |d L_i / d W| / L_i, their EMA m_i, and task i's
multiplier on L_i is (max_j m_j / m_i) / L_i. The paper balances an EMA of each task's whole
shared gradient vector; here the EMA is of its size at W, and the update is that of the current
gradients. Not the mean's scale: the step follows the largest task gradient, as in the paper.
The EMA is state, the same on every rank (one all-reduce of the K losses and K norms a step), saved with the
checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from distributed_mtml.aggregation.loss_weighting import StepWeighting
from distributed_mtml.aggregation.shared_layer import suite_losses_and_norms

FLOOR = 1e-8  # the paper's offset inside the logarithm


class DualBalancing(StepWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 db_beta: float = 0.9, shared: nn.Parameter | None = None, **common):
        super().__init__(owned, order, types, **common)
        self.beta = db_beta
        self.at = (shared,)  # W, in a tuple: the trunk's parameter, not this module's
        self.register_buffer("sizes", torch.zeros(len(order), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def suite_multipliers(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        every, norms = suite_losses_and_norms(losses, self.at[0], rows, self.gather)
        every = every + FLOOR
        size = norms / every
        self.sizes = size if self.steps == 0 else self.beta * self.sizes + (1 - self.beta) * size
        self.steps += 1
        return self.sizes.max() / self.sizes.clamp_min(1e-30) / every
