"""One multi-task optimisation step and the batches that feed it.

Shared by the Ray worker loop and by the single-process baseline of the throughput
benchmark, so the two measure exactly the same work.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from distributed_mtml.models import TaskShape, task_losses
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
        self.joined: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (rows of many tasks, their targets, where its own start)

    def epoch(self, epoch: int, steps: int, rows: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`steps` batches; `rows`: this epoch's rows where `epochs` drew them for many tasks at once."""
        if rows is None:
            rows = shuffled_rows(self.seed, [self.task_index], [len(self.y)], epoch, [steps * self.batch_size])[0]
        index = torch.from_numpy(rows).view(steps, self.batch_size).to(self.x.device)
        for batch in index:
            yield self.x[batch], self.y[batch]


JOIN_ROWS = 10_000
"""Tasks with up to this many train rows are held joined (`join_rows`): a step's batches of a
thousand small tasks are then one gather, not two a task. A larger task gathers its own."""


def join_rows(batches: list[TaskBatches]) -> None:
    """Holds the small tasks' train rows in one tensor (and their targets in another), each task's
    own rows becoming a view of it, where they share feature width and dtypes: what lets `epochs`
    take every task's batch of a step in one gather. Memory stays the same once the caller drops
    the originals (the worker keeps the views as the tasks' train splits)."""
    small = [b for b in batches if len(b.y) <= JOIN_ROWS]
    if len(small) < 2 or len({(b.x.shape[1:], b.x.dtype, b.y.shape[1:], b.y.dtype) for b in small}) > 1:
        return
    x, y = torch.cat([b.x for b in small]), torch.cat([b.y for b in small])
    start = 0
    for b in small:
        n = len(b.y)
        b.x, b.y, b.joined = x[start : start + n], y[start : start + n], (x, y, start)
        start += n


def epochs(batches: list, epoch: int, steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each step's batch of every source, in order. The in-memory tasks' (`TaskBatches`) rows are
    drawn together; those held joined (`join_rows`) are taken in one gather a step and split by
    task (the same rows as each task's own gather); a streamed task's source
    (`data.stream.StreamedBatches`) draws its own."""
    held = [b for b in batches if isinstance(b, TaskBatches)]
    drawn = dict(zip(map(id, held), shuffled_rows(held[0].seed, [b.task_index for b in held], [len(b.y) for b in held],
                                                  epoch, [steps * b.batch_size for b in held]))) if held else {}
    first = next((b.joined[0] for b in held if b.joined is not None), None)
    joined = [b for b in held if b.joined is not None and b.joined[0] is first]
    places = {id(b) for b in joined}
    own = {i: b.epoch(epoch, steps, drawn[id(b)]) if id(b) in drawn else b.epoch(epoch, steps)
           for i, b in enumerate(batches) if id(b) not in places}
    if not joined:
        yield from (list(group) for group in zip(*own.values()))
        return
    x, y = joined[0].joined[:2]
    index = torch.from_numpy(np.concatenate([drawn[id(b)].reshape(steps, b.batch_size) + b.joined[2] for b in joined], 1))
    index, sizes = index.to(x.device), [b.batch_size for b in joined]
    at = [i for i, b in enumerate(batches) if id(b) in places]
    for step in range(steps):
        group: list = [None] * len(batches)
        for i, part in zip(at, zip(x[index[step]].split(sizes), y[index[step]].split(sizes))):
            group[i] = part
        for i, stream in own.items():
            group[i] = next(stream)
        yield group


def multitask_step(
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict[str, TaskShape],
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_scale: float,
    weighted_total: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    trunk_grad_scale: float = 1.0,
) -> torch.Tensor:
    """Forward all owned tasks' batches (under `autocast`), backward the scaled (weighted) sum
    of their losses, scale the trunk's gradient, step. Returns each task's (detached,
    unweighted) loss, [tasks] in the batches' order.

    With `loss_scale` 1/K (K tasks in the suite) every head and adapter gets the gradient of
    the suite's mean loss, however many workers there are; DDP averages the trunk's gradient
    over W ranks, so `trunk_grad_scale` W makes it the sum over ranks, the suite's mean again.
    (Scaling the loss by W/K instead gives the same trunk, but heads whose gradient, and Adam
    moments, depend on W: a run could not move tasks between worker counts.)"""
    losses = task_losses(trunk, modules, shapes, batches, autocast)
    if weighted_total is not None:
        total = weighted_total(losses, [len(y) for _, y in batches.values()])
    else:
        total = losses.sum()
    optimizer.zero_grad(set_to_none=True)
    (total if loss_scale == 1.0 else total * loss_scale).backward()
    if trunk_grad_scale != 1.0:
        for p in trunk.parameters():
            if p.grad is not None:
                p.grad.mul_(trunk_grad_scale)
    optimizer.step()
    return losses.detach()
