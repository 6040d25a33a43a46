"""One multi-task optimisation step and the batches that feed it.

Shared by the Ray worker loop and by the single-process baseline of the throughput
benchmark, so the two measure exactly the same work.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from distributed_mtml.models import TaskShape, by_task, task_losses
from distributed_mtml.segments import row_places, row_tasks


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each element (arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled_rows(seed: int, task_indices: Sequence[int], sizes: Sequence[int], epoch: int,
                  needed: Sequence[int]) -> list[np.ndarray]:
    """For each task, its first `needed` rows of an epoch: permutations of its rows, one pass after
    another. Pass p of task t at epoch e is its rows sorted by a hash of (seed, t, e, p, row), so a
    task's batches do not depend on where it is placed or which tasks are beside it (a resumed or
    resized run sees the same), and a thousand tasks are shuffled in a few array operations
    rather than a generator each (which was 5% of a 1,000-task run)."""
    sizes, needed = np.asarray(sizes, np.int64), np.asarray(needed, np.int64)
    counts = -(-needed // np.maximum(sizes, 1)) * sizes  # whole passes a task
    task, place = row_tasks(counts.tolist()).numpy(), row_places(counts.tolist()).numpy()  # place: within its task
    passes, row = place // sizes[task], place % sizes[task]
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(task), seed % 2**64, np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
        for part in (np.asarray(task_indices, np.uint64)[task], np.uint64(epoch), passes.astype(np.uint64),
                     row.astype(np.uint64)):
            key = _mix(key ^ part)
    ordered = row[np.lexsort((key, passes, task))]
    starts = np.cumsum(counts) - counts
    return [ordered[start : start + n] for start, n in zip(starts, needed)]


class TaskBatches:
    """Endless shuffled mini-batches of one task's train split, reproducible per epoch
    (`shuffled_rows`): a run resumed from a checkpoint sees the batches it would have seen."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, task_index: int):
        self.x, self.y, self.batch_size = x, y, min(batch_size, len(y))
        self.seed, self.task_index = seed, task_index

    def epoch(self, epoch: int, steps: int, rows: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`steps` batches; `rows`: this epoch's rows where `epochs` drew them for many tasks at once."""
        if rows is None:
            rows = shuffled_rows(self.seed, [self.task_index], [len(self.y)], epoch, [steps * self.batch_size])[0]
        index = torch.from_numpy(rows).view(steps, self.batch_size).to(self.x.device)
        for batch in index:
            yield self.x[batch], self.y[batch]


def epochs(batches: list, epoch: int, steps: int) -> list[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Each source's batches of the epoch, the in-memory tasks' (`TaskBatches`) rows drawn together;
    a streamed task's source (`data.stream.StreamedBatches`) draws its own."""
    held = [b for b in batches if isinstance(b, TaskBatches)]
    drawn = dict(zip(map(id, held), shuffled_rows(held[0].seed, [b.task_index for b in held], [len(b.y) for b in held],
                                                  epoch, [steps * b.batch_size for b in held]))) if held else {}
    return [b.epoch(epoch, steps, drawn[id(b)]) if id(b) in drawn else b.epoch(epoch, steps) for b in batches]


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
        total = losses.sum()
    optimizer.zero_grad(set_to_none=True)
    (total if loss_scale == 1.0 else total * loss_scale).backward()
    if trunk_grad_scale != 1.0:
        for p in trunk.parameters():
            if p.grad is not None:
                p.grad.mul_(trunk_grad_scale)
    optimizer.step()
    return by_task(names, losses)
