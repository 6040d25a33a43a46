"""What a multi-task training checkpoint holds beyond the common files (`runtime/checkpoint.py`),
keyed by task, not by rank, so that an elastic run that restarts with another worker count
finds each task's state wherever the task now lives:
  optim_trunk.pt        rank 0: the optimiser state of the trunk's parameters (the same on every
                        rank), its hyperparameters, and the loss weighting's shared state
  optim_tasks_rank<r>.pt  rank r, by task: the optimiser state of its tasks' adapters, heads and
                        loss weights, and the loss weights themselves (older: optim_task_<name>.pt)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distributed_mtml import __version__
from distributed_mtml.heads.offset_bank import BankRow, entries, optimised
from distributed_mtml.runtime.checkpoint import (
    SHARED_HEADS_FILE,
    STATE_FILE,
    TASKS_PREFIX,
    TRUNK_FILE,
    load_file,
    load_into,
    load_state,
    load_state_dict,
    packed,
    ranked_states,
    task_states,
    tasks_file,
)

TRUNK_OPTIM_FILE = "optim_trunk.pt"


def task_optim_file(name: str) -> str:
    return f"optim_task_{name}.pt"


OPTIM_PREFIX = f"optim_{TASKS_PREFIX}"


def tasks_optim_file(rank: int) -> str:
    return f"{OPTIM_PREFIX}{rank}.pt"


def parameter_groups(trunk: nn.Module, modules: nn.ModuleDict, weighting: nn.Module,
                     shared: nn.ModuleDict | None = None) -> dict[str, list[nn.Parameter | BankRow]]:
    """'trunk' (with the shared head parts, the same on every rank as the trunk) and each owned
    task -> its parameters, a bound head's offsets as its rows of the worker's bank
    (`offset_bank.entries`). The optimiser takes them in this order (`optimised`), so its state
    (indexed by position) can be cut into the same groups."""
    groups: dict[str, list[nn.Parameter | BankRow]] = {
        "trunk": [*trunk.parameters(), *(shared.parameters() if shared is not None else ())]}
    for name, module in modules.items():
        groups[name] = [*entries(module), *weighting.task_parameters(name)]
    return groups


def optimised_parameters(groups: dict[str, list[nn.Parameter | BankRow]]) -> list[nn.Parameter]:
    """What the optimiser takes: every parameter of `groups`, in order, each once."""
    return optimised([entry for group in groups.values() for entry in group])


def _cut(entry: nn.Parameter | BankRow, state: dict[int, dict], index: dict[int, int]) -> dict:
    """The optimiser's state of one entry: a parameter's, or a bank row's part of its bank's."""
    if not isinstance(entry, BankRow):
        return state.get(index[id(entry)], {})
    whole = state.get(index[id(entry.param)], {})
    return {k: v[entry.index] if _shaped(v, entry.param.shape) else v for k, v in whole.items()}


def _shaped(value: object, shape: torch.Size) -> bool:
    """Whether an optimiser state value has a bank's (or a row's) shape: Adam's moments, which
    are cut by row; not its step count, which every row shares."""
    return isinstance(value, torch.Tensor) and value.shape == shape


def save_worker_state(directory: str, rank: int, epoch: int, plan: str, trunk: nn.Module,
                      modules: nn.ModuleDict, optimizer: torch.optim.Optimizer, weighting: nn.Module,
                      monitor: dict | None = None, shared: nn.ModuleDict | None = None, refit: dict | None = None,
                      groups: dict[str, list[nn.Parameter | BankRow]] | None = None) -> None:
    """This rank's share of a checkpoint: rank 0 the run's state, the trunk and the shared head
    parts, every rank its tasks. `plan`: the run's plan as `plan_text`; `monitor`: the
    best-model and early-stopping state (`runtime/monitor.py`); `refit`: what the heads' refit
    carries from one epoch to the next (`shared_plus_offset.SharedLast.state`), so that a
    resumed run refits as an unbroken one; `groups`: `parameter_groups` of these parts, where
    the caller keeps them (a walk over every task's parameters otherwise)."""
    groups = groups or parameter_groups(trunk, modules, weighting, shared)
    state = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(optimised_parameters(groups))}
    cut = {key: [_cut(entry, state["state"], index) for entry in group] for key, group in groups.items()}
    if rank == 0:
        run_state = {"epoch": epoch, "plan": plan, "version": __version__, "monitor": monitor or {},
                     "refit": refit or {}}
        torch.save(run_state, os.path.join(directory, STATE_FILE))
        torch.save(trunk.state_dict(), os.path.join(directory, TRUNK_FILE))
        if shared is not None and len(shared):
            torch.save(shared.state_dict(), os.path.join(directory, SHARED_HEADS_FILE))
        torch.save({"optimizer": cut["trunk"], "param_groups": state["param_groups"],
                    "weighting": weighting.shared_state()}, os.path.join(directory, TRUNK_OPTIM_FILE))
    torch.save(packed({name: module.state_dict() for name, module in modules.items()}),
               os.path.join(directory, tasks_file(rank)))
    torch.save(packed({name: {"optimizer": cut[name],
                              "weighting": [p.detach().clone() for p in weighting.task_parameters(name)]}
                       for name in modules}), os.path.join(directory, tasks_optim_file(rank)))


def restore_worker_state(directory: str, trunk: nn.Module, modules: nn.ModuleDict,
                         optimizer: torch.optim.Optimizer, weighting: nn.Module,
                         shared: nn.ModuleDict | None = None) -> tuple[int, dict, dict]:
    """Loads the trunk, the shared head parts and this rank's tasks, each from its own files
    whichever rank wrote them; returns the next epoch to run, the monitor's saved state and the
    refit's (empty in older checkpoints: the refit starts cold). A
    checkpoint from before task-keyed optimiser files restores the weights, and the optimiser
    starts fresh."""
    load_into(trunk, os.path.join(directory, TRUNK_FILE))
    load_shared_heads(shared, directory)
    states = task_states(directory, list(modules))
    for name, module in modules.items():
        load_state_dict(module, states[name], f"{directory} (task '{name}')")
    trunk_path = os.path.join(directory, TRUNK_OPTIM_FILE)
    if os.path.exists(trunk_path):
        groups = parameter_groups(trunk, modules, weighting, shared)
        _restore_optimizer(directory, modules, optimizer, weighting, load_file(trunk_path), groups)
    state = load_state(directory)
    return int(state["epoch"]) + 1, state.get("monitor", {}), state.get("refit", {})


def load_shared_heads(shared: nn.ModuleDict | None, directory: str) -> None:
    """The shared head parts, where the model has any."""
    if shared is not None and len(shared):
        load_into(shared, os.path.join(directory, SHARED_HEADS_FILE))


def _restore_optimizer(directory: str, modules: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                       weighting: nn.Module, saved_trunk: dict, groups: dict[str, list[nn.Parameter | BankRow]]) -> None:
    """The optimiser's state from the trunk's file and each task's (wherever it was saved), a
    bank's put together from its tasks' rows."""
    weighting.load_state_dict({**weighting.state_dict(), **saved_trunk["weighting"]})
    saved = {"trunk": list(saved_trunk["optimizer"])}
    by_task = ranked_states(directory, OPTIM_PREFIX)
    for name in modules:
        task = by_task.get(name) or load_file(os.path.join(directory, task_optim_file(name)))
        saved[name] = task["optimizer"]
        with torch.no_grad():
            for p, value in zip(weighting.task_parameters(name), task["weighting"]):
                p.copy_(value)
    params = optimised_parameters(groups)
    index = {id(p): i for i, p in enumerate(params)}
    state: dict[int, dict] = {}
    rows: dict[int, dict[int, dict]] = {}
    for key, group in groups.items():
        for entry, value in zip(group, saved[key]):
            if isinstance(entry, BankRow):
                rows.setdefault(index[id(entry.param)], {})[entry.index] = value
            elif value:
                state[index[id(entry)]] = value
    for i, by_row in rows.items():
        values = [by_row[r] for r in range(len(by_row))]
        if values[0]:
            state[i] = {k: torch.stack([v[k] for v in values]) if _shaped(v0, params[i].shape[1:]) else v0
                        for k, v0 in values[0].items()}
    param_groups = [{**g, "params": current["params"]}
                    for g, current in zip(saved_trunk["param_groups"], optimizer.state_dict()["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
