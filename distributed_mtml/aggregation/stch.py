"""STCH: smooth Tchebycheff scalarisation, a smooth maximum of the normalised log losses.

Reference: Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
ICML 2024, in the form of the authors' multi-task code: for the first `stch_warmup` epochs the
objective is sum_i log L_i (multiplier 1/L_i in our mean convention); the mean training losses of
the epoch after those become the nadir point n (state, checkpointed); from then on the objective
is mu log sum_i exp(log(L_i / n_i) / mu), whose multiplier for task i is K softmax_i / L_i.
Small `stch_mu` approaches the worst task alone, large mu the log losses' mean. Needs every
task's loss at each step (one all-reduce of K floats across workers).

Not the mean's scale: a multiplier of 1/L_i makes steps larger as losses fall (the log loss's
own scale), as in the paper.
"""

from __future__ import annotations

import torch

from distributed_mtml.aggregation.loss_weighting import StepWeighting

FLOOR = 1e-20  # the authors' offset inside the logarithm


class SmoothTchebycheff(StepWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 stch_mu: float = 1.0, stch_warmup: int = 4, **common):
        super().__init__(owned, order, types, **common)
        self.mu, self.warmup = stch_mu, stch_warmup
        self.register_buffer("nadir", torch.zeros(len(order), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def suite_multipliers(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        every = self.suite_losses(losses).clamp_min(FLOOR)
        if self.seen <= self.warmup:
            return 1 / every
        share = torch.softmax(torch.log(every / self.nadir) / self.mu, 0)
        return len(self.order) * share / every

    def end_epoch(self, epoch_losses: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.warmup + 1:
            self.nadir = epoch_losses.to(self.nadir).clamp_min(FLOOR)
