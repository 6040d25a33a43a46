"""`ple`: Progressive Layered Extraction (Tang et al., "Progressive Layered Extraction (PLE): A
Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020): CGC
levels stacked, one level per width of `model.trunk.widths` (by default two: 100, then 50).

At each level every expert is one layer of that width. The shared experts (`model.experts`)
read the shared path: the input at the first level, then a shared gate's mix of the level
below's shared experts. Each task's experts (`model.task_experts`) read the task's path: its
input, then its own gate's mix of the level below's shared and own experts. The head reads the
task's mix at the last level. The shared part (every level's shared experts and the shared
gates) is on every worker, synchronised as a trunk is; each task's experts and gates live in its
module on its owner. One difference from the article: its shared gates of inner levels also weigh
every task's own experts, which would put every task's experts on every worker; here they weigh
the shared experts only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.architectures.mmoe import Gate, experts
from distributed_mtml.layers import with_input

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


class SharedLevels(nn.Module):
    """Every level's shared experts on the shared path: [rows, sum over levels of experts x width]."""

    passes_input = 0  # its output holds no column of its input

    def __init__(self, cfg: ModelConfig, in_width: int):
        super().__init__()
        widths, count = cfg.trunk.widths, cfg.experts
        ins = [in_width, *widths[:-1]]
        self.levels = nn.ModuleList([experts(cfg, i, count, [w]) for i, w in zip(ins, widths)])
        self.gates = nn.ModuleList([Gate(i, count, w, False) for i, w in zip(ins[:-1], widths[:-1])])  # inner levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, path = [], x
        for level, level_experts in enumerate(self.levels):
            out = level_experts(path)
            outputs.append(out)
            if level < len(self.gates):
                path = self.gates[level].mixed(path, out)
        return torch.cat(outputs, -1)


def shared(cfg: ModelConfig, in_width: int, tasks: int) -> SharedLevels:
    return SharedLevels(cfg, in_width)


class TaskLevels(nn.Module):
    """A task's own experts and gate at every level, on its path through the shared ones."""

    def __init__(self, cfg: ModelConfig, in_width: int):
        super().__init__()
        widths, shared, own = cfg.trunk.widths, cfg.experts, cfg.task_experts
        ins = [in_width, *widths[:-1]]
        self.own = nn.ModuleList([experts(cfg, i, own, [w]) for i, w in zip(ins, widths)])  # one layer a level
        self.gates = nn.ModuleList([Gate(i, shared + own, w, False) for i, w in zip(ins, widths)])
        self.sizes = [shared * w for w in widths]  # each level's columns of the shared output
        self.passthrough = cfg.trunk.passthrough

    def _path(self, inputs: torch.Tensor, shared_output: torch.Tensor, levels: int) -> torch.Tensor:
        """The task's path through its first `levels` levels."""
        path = inputs
        for own, gate, theirs in list(zip(self.own, self.gates, shared_output.split(self.sizes, -1)))[:levels]:
            path = gate.mixed(path, torch.cat([theirs, own(path)], -1))
        return path

    def forward(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        return with_input(self._path(inputs, shared_output, len(self.gates)), inputs, self.passthrough)

    def shared_weights(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        """What the task draws from each shared expert of the last level, then from its own
        there together (as `cgc`'s): [rows, shared experts + 1]."""
        path = self._path(inputs, shared_output, len(self.gates) - 1)
        return self.gates[-1].with_own_column(path, len(self.own[-1].experts))


def task_part(cfg: ModelConfig, in_width: int, index: int, tasks: int) -> TaskLevels:
    return TaskLevels(cfg, in_width)


class SharedPath(nn.Module):
    """A task the model was not trained on: it has no experts of its own, so at every level it
    reads the shared experts alone, weighed by the known tasks' gates' rows for them, averaged
    (as `cgc.new_task_part`)."""

    def __init__(self, gates: list[Gate], sizes: list[int], passthrough: bool):
        super().__init__()
        self.gates, self.sizes, self.passthrough = nn.ModuleList(gates), sizes, passthrough

    def forward(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        path = inputs
        for gate, theirs in zip(self.gates, shared_output.split(self.sizes, -1)):
            path = gate.mixed(path, theirs)
        return with_input(path, inputs, self.passthrough)


def new_task_part(known: list[TaskLevels]) -> SharedPath:
    first = known[0]
    gates = [Gate.averaged([k.gates[level] for k in known], gate.count - len(first.own[level].experts), False)
             for level, gate in enumerate(first.gates)]
    return SharedPath(gates, first.sizes, first.passthrough)
