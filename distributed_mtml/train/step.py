"""One multi-task optimisation step and the batches that feed it.

Shared by the Ray worker loop and by the single-process baseline of the throughput
benchmark, so the two measure exactly the same work.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from distributed_mtml.models import TaskShape, task_losses


class TaskBatches:
    """Endless shuffled mini-batches of one task's train split, reproducible per epoch.

    The permutation depends only on (seed, task index, epoch, pass), so a run resumed from
    a checkpoint sees the same batches it would have seen without the interruption.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, task_index: int):
        self.x, self.y, self.batch_size = x, y, min(batch_size, len(y))
        self.seed, self.task_index = seed, task_index

    def epoch(self, epoch: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.empty(0, dtype=np.int64)
        needed, passes = steps * self.batch_size, 0
        while len(order) < needed:
            rng = np.random.default_rng([self.seed, self.task_index, epoch, passes])
            order = np.concatenate([order, rng.permutation(len(self.y))])
            passes += 1
        index = torch.from_numpy(order[:needed]).view(steps, self.batch_size).to(self.x.device)
        for rows in index:
            yield self.x[rows], self.y[rows]


def multitask_step(
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict[str, TaskShape],
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_scale: float,
    weighted_total: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    trunk_grad_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Forward all owned tasks' batches (under `autocast`), backward the scaled (weighted) sum
    of their losses, scale the trunk's gradient, step. Returns each task's (detached,
    unweighted) loss.

    With `loss_scale` 1/K (K tasks in the suite) every head and adapter gets the gradient of
    the suite's mean loss, however many workers there are; DDP averages the trunk's gradient
    over W ranks, so `trunk_grad_scale` W makes it the sum over ranks, the suite's mean again.
    (Scaling the loss by W/K instead gives the same trunk, but heads whose gradient, and Adam
    moments, depend on W: a run could not move tasks between worker counts.)"""
    names = list(batches)
    losses = task_losses(trunk, modules, shapes, batches, autocast)
    if weighted_total is not None:
        total = weighted_total(losses)
    else:
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    optimizer.zero_grad(set_to_none=True)
    (total if loss_scale == 1.0 else total * loss_scale).backward()
    if trunk_grad_scale != 1.0:
        for p in trunk.parameters():
            if p.grad is not None:
                p.grad.mul_(trunk_grad_scale)
    optimizer.step()
    return {n: loss.detach() for n, loss in zip(names, losses)}
