"""Sums over the ranks of the process group, the one way every part exchanges what each rank
holds a share of: em's sufficient statistics, meta-gradients and validation curves, the shared
heads' gradients, representation-weighted trunk gradients. With one rank (local mode, one
worker) nothing is exchanged."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def summed(values: torch.Tensor, world: int, device: torch.device | None = None) -> torch.Tensor:
    """`values` summed over ranks, on `device` (the process group's; default: where they are)."""
    if world > 1:
        values = values.to(device) if device is not None else values
        dist.all_reduce(values)
    return values


def sum_grads(params: list[nn.Parameter], world: int) -> None:
    """Each parameter's gradient replaced by its sum over ranks, in one flat all-reduce; a rank
    without a gradient for one (its tasks do not use it) adds zeros."""
    if world == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
