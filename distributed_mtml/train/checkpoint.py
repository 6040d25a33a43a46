"""Checkpoints that describe themselves and load with `weights_only=True`.

Layout of one checkpoint directory (Ray merges what every worker writes into it):
  state.pt          rank 0: epoch, plan (config, tasks, placement), package version
  trunk.pt          rank 0: trunk state_dict (identical on every rank)
  task_<name>.pt    owner rank: the task's adapter + head state_dict
  optim_rank<r>.pt  rank r: optimiser and loss-weighting state, and the tasks it covered
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distributed_mtml import __version__
from distributed_mtml.models import MultiTaskModel

STATE_FILE = "state.pt"
TRUNK_FILE = "trunk.pt"


def task_file(name: str) -> str:
    return f"task_{name}.pt"


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
) -> None:
    if rank == 0:
        torch.save({"epoch": epoch, "plan": plan_dict, "version": __version__}, os.path.join(directory, STATE_FILE))
        torch.save(trunk.state_dict(), os.path.join(directory, TRUNK_FILE))
    for name, module in task_modules.items():
        torch.save(module.state_dict(), os.path.join(directory, task_file(name)))
    torch.save(
        {"optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(), "tasks": sorted(task_modules.keys())},
        os.path.join(directory, optim_file(rank)),
    )


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(directory: str) -> dict:
    return _load(os.path.join(directory, STATE_FILE))


def restore_worker_state(
    directory: str,
    rank: int,
    trunk: nn.Module,
    task_modules: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    weighting: nn.Module,
) -> int:
    """Loads what this rank owns and returns the next epoch to run.

    The optimiser and loss-weighting state are restored only when this rank owned the same
    tasks before; after a change of `num_workers` they start fresh rather than pairing
    moments or log-variances with the wrong tasks.
    """
    trunk.load_state_dict(_load(os.path.join(directory, TRUNK_FILE)))
    for name, module in task_modules.items():
        module.load_state_dict(_load(os.path.join(directory, task_file(name))))
    optim_path = os.path.join(directory, optim_file(rank))
    if os.path.exists(optim_path):
        saved = _load(optim_path)
        if saved["tasks"] == sorted(task_modules.keys()):
            optimizer.load_state_dict(saved["optimizer"])
            weighting.load_state_dict(saved["weighting"])
    return int(load_state(directory)["epoch"]) + 1


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The newest checkpoint Ray Train persisted for this run: its directory names sort by
    epoch (or meta-iteration). Any pyarrow filesystem URI, or a local path."""
    import pyarrow.fs

    scheme = storage_path.split("://")[0] + "://" if "://" in storage_path else ""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path) if scheme else (pyarrow.fs.LocalFileSystem(), storage_path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{run_name}", allow_not_found=True))
    found = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    return scheme + found[-1] if found else None


def load_model(directory: str) -> tuple[MultiTaskModel, dict]:
    """The full trunk + every head from a checkpoint (or model artifact) directory, and its plan.
    A meta-learned model is a trunk with one head, "meta"."""
    from distributed_mtml.train.plan import TrainPlan

    state = load_state(directory)
    if state.get("kind") == "meta":
        from distributed_mtml.meta.checkpoint import load_learner

        learner, plan = load_learner(directory)
        return learner.model, plan
    plan = TrainPlan.model_validate(state["plan"])
    model = MultiTaskModel(plan.config.model, plan.task_shapes(), plan.config.training.seed)
    model.trunk.load_state_dict(_load(os.path.join(directory, TRUNK_FILE)))
    for name, module in model.task_modules.items():
        module.load_state_dict(_load(os.path.join(directory, task_file(name))))
    model.eval()
    return model, state["plan"]
