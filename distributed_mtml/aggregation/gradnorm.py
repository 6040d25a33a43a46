"""GradNorm: task weights learned so that every task's gradient norm trains at a common rate.

Reference: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018. Weights w_i (starting at 1, summing to K) multiply the losses.
At each step, with n_i = |d L_i / d W| at the last shared layer (`shared_layer`), G_i = w_i n_i,
their mean G, and r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) each task's relative inverse
training rate, the weights descend sum_i |G_i - G r_i^alpha| (the target held constant) by a
gradient step of `gradnorm_lr`, then are renormalised to sum to K. `gradnorm_alpha` (the paper's
1.5 for its tasks) sets how hard slow tasks are pushed.

Across workers the weights are the same on every rank: each rank measures n_i of its own tasks,
and the norms and losses of all come from one all-reduce (2K floats a step). The weights
and L(0) are state, saved with the checkpoint. The paper trains w with the network's optimiser;
here it is a plain gradient step, so that it stays the same on every rank without an optimiser
state of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from distributed_mtml.aggregation.loss_weighting import LossWeighting
from distributed_mtml.aggregation.shared_layer import suite_losses_and_norms


class GradNorm(LossWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 gradnorm_alpha: float = 1.5, gradnorm_lr: float = 0.025, shared: nn.Parameter | None = None,
                 **common):
        super().__init__(owned, order, types, **common)
        self.alpha, self.lr = gradnorm_alpha, gradnorm_lr
        self.at = (shared,)  # W, in a tuple: the trunk's parameter, not this module's
        self.register_buffer("task_weights", torch.ones(len(order), dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(len(order), dtype=torch.float64))

    def multipliers(self) -> torch.Tensor:
        return self.task_weights[self.places].float()

    def total(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        out = super().total(losses)  # this step's weights; the update below is for the next
        every, norms = suite_losses_and_norms(losses, self.at[0], rows, self.gather)
        if not bool(self.initial.any()):
            self.initial = every.clamp_min(1e-12)
        self._learn(every, norms)
        return out

    def _learn(self, every: torch.Tensor, norms: torch.Tensor) -> None:
        w = self.task_weights
        g = w * norms
        rate = every / self.initial
        target = g.mean() * (rate / rate.mean()) ** self.alpha
        w = (w - self.lr * torch.sign(g - target) * norms).clamp_min(1e-6)
        self.task_weights = w * len(self.order) / w.sum()
