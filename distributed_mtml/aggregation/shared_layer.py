"""Each task's gradient norm at the last shared layer: what GradNorm and DB-MTL balance.

Both papers measure a task's pull on the shared network at its last shared weight matrix W
(cheaper than the whole trunk, and for a plain trunk the layer every head reads). Here W is the
trunk's last parameter of two or more dimensions in module order: an MLP trunk's last Linear, an
expert trunk's last expert's. Each owned task takes one autograd.grad of its loss to W (the graph
above W only, not the trunk's), and the norms of all tasks come from the weighting's gather (one
all-reduce of K floats across workers).
"""

from __future__ import annotations

import torch
from torch import nn


def last_weight(trunk: nn.Module) -> nn.Parameter | None:
    """W: the trunk's last trainable parameter of two or more dimensions; None if it has none."""
    matrices = [p for p in trunk.parameters() if p.requires_grad and p.dim() >= 2]
    return matrices[-1] if matrices else None


def norms(losses: list[torch.Tensor], weight: nn.Parameter) -> torch.Tensor:
    """|d L_i / d W| of each owned task's loss, [n] float64 (0 where a loss does not reach W)."""
    out = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        out.append(grad.detach().double().norm() if grad is not None else torch.zeros((), dtype=torch.float64))
    return torch.stack(out)
