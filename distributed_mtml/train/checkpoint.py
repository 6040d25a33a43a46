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
                     shared: nn.ModuleDict | None = None) -> dict[str, list[nn.Parameter]]:
    """'trunk' (with the shared head parts, the same on every rank as the trunk) and each owned
    task -> its parameters. The optimiser takes them in this order, so its state (indexed by
    position) can be cut into the same groups."""
    groups = {"trunk": [*trunk.parameters(), *(shared.parameters() if shared is not None else ())]}
    for name, module in modules.items():
        groups[name] = [*module.parameters(), *weighting.task_parameters(name)]
    return groups


def _spans(groups: dict[str, list[nn.Parameter]]) -> dict[str, range]:
    spans, start = {}, 0
    for key, params in groups.items():
        spans[key] = range(start, start + len(params))
        start += len(params)
    return spans


def save_worker_state(directory: str, rank: int, epoch: int, plan: str, trunk: nn.Module,
                      modules: nn.ModuleDict, optimizer: torch.optim.Optimizer, weighting: nn.Module,
                      monitor: dict | None = None, shared: nn.ModuleDict | None = None, refit: dict | None = None,
                      groups: dict[str, list[nn.Parameter]] | None = None) -> None:
    """This rank's share of a checkpoint: rank 0 the run's state, the trunk and the shared head
    parts, every rank its tasks. `plan`: the run's plan as `plan_text`; `monitor`: the
    best-model and early-stopping state (`runtime/monitor.py`); `refit`: what the heads' refit
    carries from one epoch to the next (`shared_plus_offset.SharedLast.state`), so that a
    resumed run refits as an unbroken one; `groups`: `parameter_groups` of these parts, where
    the caller keeps them (a walk over every task's parameters otherwise)."""
    groups = groups or parameter_groups(trunk, modules, weighting, shared)
    state = optimizer.state_dict()
    per_param = [state["state"].get(i, {}) for i in range(sum(len(p) for p in groups.values()))]
    spans = _spans(groups)
    if rank == 0:
        run_state = {"epoch": epoch, "plan": plan, "version": __version__, "monitor": monitor or {},
                     "refit": refit or {}}
        torch.save(run_state, os.path.join(directory, STATE_FILE))
        torch.save(trunk.state_dict(), os.path.join(directory, TRUNK_FILE))
        if shared is not None and len(shared):
            torch.save(shared.state_dict(), os.path.join(directory, SHARED_HEADS_FILE))
        torch.save({"optimizer": [per_param[i] for i in spans["trunk"]], "param_groups": state["param_groups"],
                    "weighting": weighting.shared_state()}, os.path.join(directory, TRUNK_OPTIM_FILE))
    torch.save(packed({name: module.state_dict() for name, module in modules.items()}),
               os.path.join(directory, tasks_file(rank)))
    torch.save(packed({name: {"optimizer": [per_param[i] for i in spans[name]],
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
        _restore_optimizer(directory, modules, optimizer, weighting, load_file(trunk_path))
    state = load_state(directory)
    return int(state["epoch"]) + 1, state.get("monitor", {}), state.get("refit", {})


def load_shared_heads(shared: nn.ModuleDict | None, directory: str) -> None:
    """The shared head parts, where the model has any."""
    if shared is not None and len(shared):
        load_into(shared, os.path.join(directory, SHARED_HEADS_FILE))


def _restore_optimizer(directory: str, modules: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                       weighting: nn.Module, saved_trunk: dict) -> None:
    per_param = list(saved_trunk["optimizer"])
    weighting.load_state_dict({**weighting.state_dict(), **saved_trunk["weighting"]})
    by_task = ranked_states(directory, OPTIM_PREFIX)
    for name in modules:
        saved = by_task.get(name) or load_file(os.path.join(directory, task_optim_file(name)))
        per_param += saved["optimizer"]
        with torch.no_grad():
            for p, value in zip(weighting.task_parameters(name), saved["weighting"]):
                p.copy_(value)
    groups = [{**g, "params": current["params"]}
              for g, current in zip(saved_trunk["param_groups"], optimizer.state_dict()["param_groups"])]
    optimizer.load_state_dict({"state": {i: s for i, s in enumerate(per_param) if s}, "param_groups": groups})
