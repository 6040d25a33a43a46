"""What a multi-task training checkpoint holds beyond the common files (`runtime/checkpoint.py`):
  optim_rank<r>.pt  rank r: optimiser and loss-weighting state, and the tasks it covered
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distributed_mtml import __version__
from distributed_mtml.runtime.checkpoint import STATE_FILE, TRUNK_FILE, load_file, load_into, load_state, task_file


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def save_worker_state(
    directory: str,
    rank: int,
    epoch: int,
    plan_dict: dict,
    trunk: nn.Module,
    task_modules: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    weighting: nn.Module,
    monitor: dict | None = None,
) -> None:
    """`monitor`: the best-model and early-stopping state (`train/monitor.py`), kept in state.pt."""
    if rank == 0:
        state = {"epoch": epoch, "plan": plan_dict, "version": __version__, "monitor": monitor or {}}
        torch.save(state, os.path.join(directory, STATE_FILE))
        torch.save(trunk.state_dict(), os.path.join(directory, TRUNK_FILE))
    for name, module in task_modules.items():
        torch.save(module.state_dict(), os.path.join(directory, task_file(name)))
    torch.save(
        {"optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(), "tasks": sorted(task_modules.keys())},
        os.path.join(directory, optim_file(rank)),
    )


def restore_worker_state(
    directory: str,
    rank: int,
    trunk: nn.Module,
    task_modules: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    weighting: nn.Module,
) -> tuple[int, dict]:
    """Loads what this rank owns; returns the next epoch to run and the monitor's saved state.

    The optimiser and loss-weighting state are restored only when this rank owned the same
    tasks before; after a change of `num_workers` they start fresh rather than pairing
    moments or log-variances with the wrong tasks.
    """
    load_into(trunk, os.path.join(directory, TRUNK_FILE))
    for name, module in task_modules.items():
        load_into(module, os.path.join(directory, task_file(name)))
    optim_path = os.path.join(directory, optim_file(rank))
    if os.path.exists(optim_path):
        saved = load_file(optim_path)
        if saved["tasks"] == sorted(task_modules.keys()):
            optimizer.load_state_dict(saved["optimizer"])
            weighting.load_state_dict(saved["weighting"])
    state = load_state(directory)
    return int(state["epoch"]) + 1, state.get("monitor", {})
