"""Many tasks' rows in one tensor: each row's task id, and per-task sums by segment reduction.

A thousand small tasks cost a thousand Python calls when handled one at a time; joined with a
task id per row, their losses and metrics are a few tensor operations (the step's losses,
validation's metrics, the stacked heads' gathers)."""

from __future__ import annotations

import torch


def row_tasks(sizes: list[int], device: torch.device | None = None) -> torch.Tensor:
    """Each row's task index when tasks of `sizes` rows are joined in order: [sum(sizes)]."""
    counts = torch.tensor(sizes, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def row_places(sizes: list[int] | torch.Tensor) -> torch.Tensor:
    """Each row's position within its task when tasks of `sizes` rows are joined in order: [sum(sizes)]."""
    counts = torch.as_tensor(sizes, dtype=torch.long)
    return torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)


def segment_means(values: torch.Tensor, tasks: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each task's mean of its rows' `values` (`tasks` from `row_tasks`): [len(sizes)]."""
    totals = torch.zeros(len(sizes), dtype=values.dtype, device=values.device).index_add(0, tasks, values)
    return totals / torch.tensor(sizes, dtype=values.dtype, device=values.device)


def in_suite_order(values: torch.Tensor, owned: list[str], order: list[str], fill: float) -> torch.Tensor:
    """`values` of the `owned` tasks (in that order; a row each where they have columns) at their
    places in the suite's `order`, `fill` elsewhere: a rank's share of a suite-wide vector (or
    table) that one all-reduce completes."""
    out = torch.full((len(order), *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    places = {name: i for i, name in enumerate(order)}
    out[torch.tensor([places[name] for name in owned], device=values.device)] = values
    return out
