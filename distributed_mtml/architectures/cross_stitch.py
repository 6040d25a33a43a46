"""`cross_stitch`: Cross-stitch networks (Misra et al., "Cross-stitch Networks for Multi-task
Learning", CVPR 2016): a column of the trunk's layers per task, and after every layer a learned
tasks x tasks matrix that mixes the columns' outputs (column i takes sum_j a_ij of column j's).

Every row goes through every column, so the columns and the mixing matrices are all shared: on
every worker, synchronised as a trunk is; a task's part only picks its column. The matrices
start near the identity (0.9 on the diagonal and 0.1 spread over the other columns, the
article's start for two tasks): columns begin nearly independent and learn how much to share.
The last matrix is how the tasks relate (`gates.py` logs it). One column per task costs the
trunk's work once per task on every row: at most `MAX_TASKS` tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.layers import mlp, with_input

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig

MAX_TASKS = 16


def start(tasks: int) -> torch.Tensor:
    """The mixing matrix at first: 0.9 kept, 0.1 spread over the other columns (1 with one task)."""
    if tasks == 1:
        return torch.ones(1, 1)
    return torch.full((tasks, tasks), 0.1 / (tasks - 1)).fill_diagonal_(0.9)


class Columns(nn.Module):
    """One column of the trunk's layers per task, stitched after every layer: [rows, tasks x width]."""

    passes_input = 0  # its output holds no column of its input

    def __init__(self, cfg: ModelConfig, in_width: int, tasks: int):
        super().__init__()
        widths = cfg.trunk.widths
        ins = [in_width, *widths[:-1]]
        self.layers = nn.ModuleList([nn.ModuleList([mlp(i, [w], cfg.trunk) for _ in range(tasks)])
                                     for i, w in zip(ins, widths)])
        self.stitches = nn.ParameterList([nn.Parameter(start(tasks)) for _ in widths])
        self.tasks, self.width = tasks, widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = [x] * self.tasks
        for layers, stitch in zip(self.layers, self.stitches):
            out = torch.stack([layer(column) for layer, column in zip(layers, columns)], 1)  # [rows, tasks, width]
            mixed = torch.einsum("ij,njw->niw", stitch.to(out.dtype), out)
            columns = list(mixed.unbind(1))
        return mixed.reshape(len(x), -1)


def shared(cfg: ModelConfig, in_width: int, tasks: int) -> Columns:
    return Columns(cfg, in_width, tasks)


class Column(nn.Module):
    """A task's column of the stitched output (then the input itself, with passthrough)."""

    def __init__(self, index: int | None, tasks: int, width: int, passthrough: bool):
        super().__init__()
        self.index, self.tasks, self.width, self.passthrough = index, tasks, width, passthrough

    def forward(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        columns = shared_output.view(len(shared_output), self.tasks, self.width)
        own = columns.mean(1) if self.index is None else columns[:, self.index]  # a new task: their mean
        return with_input(own, inputs, self.passthrough)


def task_part(cfg: ModelConfig, in_width: int, index: int, tasks: int) -> Column:
    return Column(index, tasks, cfg.trunk.widths[-1], cfg.trunk.passthrough)


def new_task_part(known: list[Column]) -> Column:
    """A task the model was not trained on has no column: it reads the columns' mean."""
    return Column(None, known[0].tasks, known[0].width, known[0].passthrough)
