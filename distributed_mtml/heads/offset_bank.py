"""A worker's task offsets stacked in one parameter per shared head, not two per task.

With a thousand tasks of one shared regression head, each task's offsets were two small
parameters: every step stacked them into [T, k, d] and [T, k] to run the tasks at once, and the
optimiser updated 2T tensors. Bound to a bank, a task's offsets are row `row` of the bank's two
parameters: the step indexes them by task id, with no copy, and the optimiser updates two
tensors (`jobs/bench_offset_bank.py`, one core, 5,000 tasks of 8 rows: 300 ms a step with a
parameter pair per task, 64 ms with the bank). Each bound head's `lam` is a view of the bank's,
so the step reads every task's penalty strength at once too.

What is saved does not change: a task's state dict holds its row as its own offsets
(`OffsetHead`), and a checkpoint cuts the optimiser's state of the bank into each task's rows
(`BankRow`, `train.checkpoint`), so that tasks move between workers as before.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from distributed_mtml.heads.shared_plus_offset import OffsetHead, _one_shared_linear


class BankRow(NamedTuple):
    """A task's row `index` of a bank's parameter: its part of the optimiser's state there."""

    param: nn.Parameter
    index: int


class OffsetBank(nn.Module):
    """The offsets of tasks over one shared linear head: weight [T, k, d], bias [T, k]."""

    def __init__(self, heads: list[OffsetHead]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([h.offsets[0].detach() for h in heads]))
        self.bias = nn.Parameter(torch.stack([h.offsets[1].detach() for h in heads]))
        self.register_buffer("lam", torch.stack([h.lam for h in heads]))  # each head's lam is its row's view
        self.register_buffer("train_rows", torch.tensor([h.rows for h in heads], dtype=torch.float64))

    def rows(self, index: int) -> list[BankRow]:
        return [BankRow(self.weight, index), BankRow(self.bias, index)]


def bind_offsets(modules: nn.ModuleDict) -> nn.ModuleList:
    """Moves the offsets of the tasks in `modules` (`models.TaskModule`s) into one bank per shared
    head they use, in the modules' order, and returns the banks (on the offsets' device). Heads
    with hidden layers (`model.head_hidden`), without offsets or of other kinds stay as they are."""
    by_shared: dict[int, list[OffsetHead]] = {}
    for module in modules.values():
        if _one_shared_linear([module.head]):
            by_shared.setdefault(id(module.head.shared), []).append(module.head)
    banks = nn.ModuleList(OffsetBank(heads) for heads in by_shared.values())
    for bank, heads in zip(banks, by_shared.values()):
        for row, head in enumerate(heads):
            head.bind(bank, row)
    return banks


def entries(module: nn.Module) -> list[nn.Parameter | BankRow]:
    """A task module's parameters in its own order, a bound head's offsets as its bank rows: how
    the optimiser state of a task is cut out and put back (`train.checkpoint`)."""
    out: list[nn.Parameter | BankRow] = []
    for child in module.children():
        out += child.parameters()
        if isinstance(child, OffsetHead) and child.bank is not None:
            out += child.bank.rows(child.row)
    return out


def optimised(entries: list[nn.Parameter | BankRow]) -> list[nn.Parameter]:
    """The parameters `entries` name, each once, in order (a bank's at its first row)."""
    seen: dict[int, nn.Parameter] = {}
    for entry in entries:
        param = entry.param if isinstance(entry, BankRow) else entry
        seen.setdefault(id(param), param)
    return list(seen.values())
