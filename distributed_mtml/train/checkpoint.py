"""Checkpoints that describe themselves and load with `weights_only=True`.

Layout of one checkpoint directory (Ray merges what every worker writes into it):
  state.pt          rank 0: epoch, plan (config, tasks, placement), package version
  trunk.pt          rank 0: trunk state_dict (identical on every rank)
  task_<name>.pt    owner rank: the task's adapter + head state_dict
  optim_rank<r>.pt  rank r: optimiser and loss-weighting state, and the tasks it covered
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from distributed_mtml import __version__
from distributed_mtml.errors import InputError
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


def load_file(path: str) -> dict:
    """One checkpoint file, as plain tensors and containers only: `weights_only=True` refuses
    anything whose unpickling would run code. A refused, missing or damaged file is bad input."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except pickle.UnpicklingError:
        raise InputError(f"{path}: refused: not a plain tensor checkpoint "
                         "(loading it would run code; torch.load weights_only=True)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {(str(e).splitlines() or [type(e).__name__])[0]}") from None


def load_into(module: nn.Module, path: str) -> None:
    """A state dict into a module built from the checkpoint's own description (state.pt)."""
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise InputError(f"{path}: does not fit the model described in {STATE_FILE} ({detail})") from None


def load_state(directory: str) -> dict:
    return load_file(os.path.join(directory, STATE_FILE))


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


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The checkpoint `--resume` continues from: the newest that Ray Train registered in its
    snapshot, written only once a checkpoint is complete, so a partial upload (a full disk, a
    killed worker) is never taken for one. Ray rewrites that snapshot in place, so a full disk
    can leave it truncated: then the newest local checkpoint whose files are all whole.
    Any pyarrow filesystem URI, or a local path."""
    import json

    import pyarrow.fs

    scheme = storage_path.split("://")[0] + "://" if "://" in storage_path else ""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path) if scheme else (pyarrow.fs.LocalFileSystem(), storage_path)
    try:
        with fs.open_input_stream(f"{root}/{run_name}/checkpoint_manager_snapshot.json") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
        return f"{scheme}{root}/{run_name}/{name}" if name else None
    except (FileNotFoundError, OSError, ValueError):
        if scheme:
            return None
    run_dir = os.path.join(root, run_name)
    names = sorted(os.listdir(run_dir), reverse=True) if os.path.isdir(run_dir) else []
    return next((os.path.join(run_dir, n) for n in names if n.startswith("checkpoint_") and _whole(os.path.join(run_dir, n))), None)


def _whole(directory: str) -> bool:
    """Every file a checkpoint of this plan holds is there and ends with its zip directory
    (torch.save's format keeps it at the end, so a cut-off file fails to open)."""
    import zipfile

    try:
        plan = load_state(directory)["plan"]
        files = [STATE_FILE, TRUNK_FILE] + [task_file(t["name"]) for t in plan.get("tasks", [])]
        for name in files:
            zipfile.ZipFile(os.path.join(directory, name)).close()
        return True
    except (InputError, OSError, KeyError, zipfile.BadZipFile):
        return False


def check_writable(storage_path: str) -> None:
    """Checkpoints must be writable before hours of training depend on them (local paths;
    an object store's permissions are the workers' to find out)."""
    if "://" in storage_path:
        return
    probe = os.path.join(storage_path, ".mtml_write_probe")
    try:
        os.makedirs(storage_path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"checkpoint.dir: {storage_path} is not writable ({e.strerror or e})") from None


def check_resumable(storage_path: str, run_name: str, model: dict) -> str | None:
    """`--resume` continues from the run's newest checkpoint, so the config must still build the
    model that checkpoint holds; said here, before any worker fails to load it. Returns that
    checkpoint (None: nothing saved yet)."""
    from distributed_mtml.config import flatten

    last = latest_checkpoint(storage_path, run_name)
    if last is None or "://" in last:  # nothing saved yet; remote storage is read by the workers
        return last
    saved = flatten(load_state(last)["plan"]["config"]["model"], "model.")
    for key, value in flatten(model, "model.").items():
        if saved.get(key) != value:
            raise InputError(f"--resume: checkpoint {last} was trained with {key} {saved.get(key)}, this config {value}")
    return last


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
    model = MultiTaskModel(plan.config.model, plan.task_shapes(), plan.config.training.seed, plan.preprocessing)
    load_into(model.trunk, os.path.join(directory, TRUNK_FILE))
    for name, module in model.task_modules.items():
        load_into(module, os.path.join(directory, task_file(name)))
    model.eval()
    return model, state["plan"]
