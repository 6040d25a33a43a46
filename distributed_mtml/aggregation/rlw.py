"""RLW: random loss weighting, a fresh draw of task weights at every step.

Reference: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022. Each step's multipliers are K softmax(z), z ~ N(0, I_K), so
they average about 1 (the mean's). Every rank draws the same z from (the run's seed, the step
count), and the step count is state, saved with the checkpoint: a resumed run draws on.
"""

from __future__ import annotations

import torch

from distributed_mtml.aggregation.loss_weighting import LossWeighting


class RandomLossWeighting(LossWeighting):
    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None, **common):
        super().__init__(owned, order, types, **common)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def multipliers(self) -> torch.Tensor:
        """The draw of the coming step."""
        draw = torch.Generator().manual_seed(1_000_003 * self.seed + int(self.steps))
        z = torch.randn(len(self.order), generator=draw, dtype=torch.float64)
        return (len(self.order) * torch.softmax(z, 0))[self.places].float()

    def total(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        out = super().total(losses)
        self.steps += 1
        return out
