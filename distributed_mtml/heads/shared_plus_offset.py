"""`shared_plus_offset`: a head shared by the tasks of one type and width, plus a penalised
per-task deviation of each of its parameters: task t's head has parameters w + v_t, and its loss
gains (head_penalty / n_t) ||v_t||^2, n_t its train rows.

Why that strength: per row of a task, a mixed model's negative log-likelihood is
mean (residual^2) / (2 sigma^2) + ||v_t||^2 / (2 tau^2 n_t); times 2 sigma^2 that is the mean
squared error plus (sigma^2 / tau^2) / n_t ||v_t||^2. So `head_penalty` plays sigma^2 / tau^2
(residual over between-task variance, in the standardised target's units), and a task with more
rows leans less on the shared head, as a random effect's shrinkage does. An infinite penalty
leaves no offsets (one shared head); zero leaves them free (as expressive as separate heads).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call

from distributed_mtml.config import ModelConfig
from distributed_mtml.heads.separate import stack


def shared(out_width: int, cfg: ModelConfig, trunk_out: int) -> nn.Module:
    return stack(trunk_out, out_width, cfg)


class OffsetHead(nn.Module):
    """The shared head evaluated at its parameters plus this task's offsets (zero at start)."""

    def __init__(self, shared_part: nn.Module, penalty: float, rows: int):
        super().__init__()
        object.__setattr__(self, "shared", shared_part)  # not registered: saved and synchronised once, apart
        finite = not math.isinf(penalty)
        self.offsets = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(p)) for p in shared_part.parameters()] if finite else [])
        self.strength = penalty / max(rows, 1) if finite else 0.0

    def _parameters_with_offsets(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p + v for (n, p), v in zip(base.named_parameters(), self.offsets)}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not len(self.offsets):
            return self.shared(features)
        return functional_call(self.shared, self._parameters_with_offsets(self.shared), (features,))

    def penalty(self) -> torch.Tensor | None:
        if not len(self.offsets) or self.strength == 0:
            return None
        return self.strength * sum((v * v).sum() for v in self.offsets)

    def standalone(self) -> nn.Module:
        """One ordinary head with this task's parameters w + v_t: what transfer starts from."""
        head = copy.deepcopy(self.shared)
        with torch.no_grad():
            for p, v in zip(head.parameters(), self.offsets):
                p.add_(v)
        return head


def task_head(out_width: int, cfg: ModelConfig, trunk_out: int, shared: nn.Module | None, rows: int) -> nn.Module:
    return OffsetHead(shared, cfg.head_penalty, rows)
