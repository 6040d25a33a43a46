"""FAMO: fast adaptive multitask optimisation, task weights learned from how fast each loss falls.

Reference: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. Weights
z = softmax(xi) over learned logits xi; the step descends sum_i z_i log L_i / c with
c = sum_i z_i / L_i, so task i's multiplier is K z_i / (c L_i) (they average 1, the mean's
scale). After each step the logits take one Adam step (`famo_lr`, L2 `famo_decay`, the paper's
0.025 and 0.001) on the gradient of sum_i z_i d_i, with d_i = log L_i(before) - log L_i(after):
weight moves away from the tasks whose loss fell most. O(1) in the task count per step: no
task gradients, only every task's loss (one all-reduce of K floats across workers).

One departure: the paper measures L(after) with a second forward pass of the same batch; here
it is the next step's loss, on the next batch, so a step costs what `mean`'s costs. The logits,
their Adam moments and the last losses are state, saved with the checkpoint.
"""

from __future__ import annotations

import torch

from distributed_mtml.aggregation.loss_weighting import StepWeighting

OFFSET = 1e-8  # inside the logarithms, as the paper's code
BETAS = (0.9, 0.999)  # Adam's defaults, as the paper's optimiser of the logits


class FastAdaptiveWeighting(StepWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 famo_lr: float = 0.025, famo_decay: float = 0.001, **common):
        super().__init__(owned, order, types, **common)
        self.lr, self.decay = famo_lr, famo_decay
        k = len(order)
        for name in ("logits", "moment", "square", "previous"):
            self.register_buffer(name, torch.zeros(k, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def suite_multipliers(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        every = self.suite_losses(losses).to(self.logits) + OFFSET
        if self.steps > 0:
            self._learn(torch.log(self.previous) - torch.log(every))
        self.previous, self.steps = every, self.steps + 1
        z = torch.softmax(self.logits, 0)
        return len(self.order) * z / ((z / every).sum() * every)

    def _learn(self, fall: torch.Tensor) -> None:
        """One Adam step of the logits on d/dxi of sum_i softmax(xi)_i fall_i, plus L2."""
        z = torch.softmax(self.logits, 0)
        grad = z * (fall - z @ fall) + self.decay * self.logits
        self.moment = BETAS[0] * self.moment + (1 - BETAS[0]) * grad
        self.square = BETAS[1] * self.square + (1 - BETAS[1]) * grad**2
        t = int(self.steps)  # updates so far, this one included
        step = self.moment / (1 - BETAS[0] ** t) / ((self.square / (1 - BETAS[1] ** t)).sqrt() + 1e-8)
        self.logits = self.logits - self.lr * step
