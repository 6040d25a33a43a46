"""Checkpoint files that describe themselves and load with `weights_only=True`, and finding them.

Layout of one checkpoint directory (Ray merges what every worker writes into it):
  state.pt          rank 0: epoch (meta: iterations done), plan (config, tasks, placement), version
  trunk.pt          rank 0: trunk state_dict (identical on every rank)
  shared_heads.pt   rank 0: the head parts tasks share (`heads/`; identical on every rank), if any
  tasks_rank<r>.pt  rank r: its tasks' adapter + head state dicts, by task name (one file a rank:
                    a thousand tasks are not a thousand files; older checkpoints: task_<name>.pt)
  ...               what the recipe adds (optimiser state per rank, Meta-SGD's rates)
"""

from __future__ import annotations

import json
import os
import pickle
import uuid

import torch
from torch import nn

from distributed_mtml import compat
from distributed_mtml.errors import InputError

STATE_FILE = "state.pt"
TRUNK_FILE = "trunk.pt"
SHARED_HEADS_FILE = "shared_heads.pt"


TASKS_PREFIX = "tasks_rank"


def task_file(name: str) -> str:
    """One task's own file: a meta-learned model's head, and multi-task checkpoints before
    `tasks_file` (read by `task_states`)."""
    return f"task_{name}.pt"


def tasks_file(rank: int) -> str:
    return f"{TASKS_PREFIX}{rank}.pt"


def packed(per_task: dict[str, object]) -> dict:
    """Many tasks' states (state dicts, optimiser state: nested dicts and lists of tensors) as one
    file holds them: when every task's state has the same structure, each tensor leaf stacked over
    the tasks ([T, ...]), so a file of a thousand tasks holds a few tensors, not thousands (a
    `weights_only` load unpickles every object: 1,000 tasks' state dicts took 2.9 s to load).
    Otherwise as given. `unpacked` reverses it."""
    names = list(per_task)
    if len(names) < 2:
        return {"tasks": names, "each": per_task}
    skeleton, first = _skeleton(per_task[names[0]])
    shape, columns = _structure(per_task[names[0]], []), [[] for _ in first]
    for name in names:
        leaves: list[object] = []
        if _structure(per_task[name], leaves) != shape:
            return {"tasks": names, "each": per_task}
        for column, leaf in zip(columns, leaves):
            column.append(leaf)
    stacked = {}
    for key, column in zip(first, columns):
        if not _stackable(column):
            return {"tasks": names, "each": per_task}
        stacked[key] = torch.stack(column) if isinstance(column[0], torch.Tensor) else column
    return {"tasks": names, "skeleton": skeleton, "stacked": stacked}


def _structure(state: object, leaves: list[object]) -> list[object]:
    """`state`'s shape as a flat list (each container's keys or length, in the order `_skeleton`
    walks it), appending its leaves to `leaves`: one cheap walk a task, where comparing the
    tasks' skeletons built a dict and a path string per leaf (0.5 s a save of 5,000 tasks)."""
    shape: list[object] = []
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            shape.append(tuple(node))
            stack.extend(reversed(node.values()))
        elif isinstance(node, (list, tuple)):
            shape.append(len(node))
            stack.extend(reversed(node))
        else:
            shape.append(None)
            leaves.append(node)
    return shape


def _stackable(column: list[object]) -> bool:
    """Whether one leaf of every task stacks into one tensor (same shape and dtype), or is a
    plain value of one type kept as a list."""
    head = column[0]
    if isinstance(head, torch.Tensor):
        return all(isinstance(v, torch.Tensor) and v.shape == head.shape and v.dtype == head.dtype for v in column)
    return all(type(v) is type(head) for v in column)


def unpacked(saved: dict) -> dict[str, object]:
    """`packed`'s file back as task -> state (stacked leaves as views of task i's row)."""
    if "each" in saved:
        return saved["each"]
    return {name: _filled(saved["skeleton"], {k: v[i] for k, v in saved["stacked"].items()})
            for i, name in enumerate(saved["tasks"])}


def _skeleton(state: object, path: str = "") -> tuple[object, dict[str, object]]:
    """(the structure with each leaf replaced by {"leaf": its path}, path -> leaf)."""
    if isinstance(state, dict):
        parts = {k: _skeleton(v, f"{path}/{k}") for k, v in state.items()}
        return {k: p[0] for k, p in parts.items()}, {k: v for p in parts.values() for k, v in p[1].items()}
    if isinstance(state, (list, tuple)):
        parts = [_skeleton(v, f"{path}/{i}") for i, v in enumerate(state)]
        return [p[0] for p in parts], {k: v for p in parts for k, v in p[1].items()}
    return {"leaf": path}, {path: state}


def _filled(skeleton: object, leaves: dict[str, object]) -> object:
    if isinstance(skeleton, dict):
        return leaves[skeleton["leaf"]] if set(skeleton) == {"leaf"} else {k: _filled(v, leaves) for k, v in skeleton.items()}
    return [_filled(v, leaves) for v in skeleton]


def ranked_states(directory: str, prefix: str) -> dict[str, object]:
    """task -> state from every rank's file `<prefix><rank>.pt` (`packed`) in the checkpoint."""
    states: dict[str, object] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(prefix) and name.endswith(".pt"):
            states.update(unpacked(load_file(os.path.join(directory, name))))
    return states


def task_states(directory: str, names: list[str]) -> dict[str, dict]:
    """The state dicts of the tasks `names`, wherever they were saved: in any rank's `tasks_file`
    (an elastic run's tasks move between ranks) or their own `task_file`; InputError naming the
    first task missing."""
    states = ranked_states(directory, TASKS_PREFIX)
    for name in names:
        if name not in states:
            states[name] = load_file(os.path.join(directory, task_file(name)))
    return {name: states[name] for name in names}


def load_state_dict(module: nn.Module, state: dict, where: str) -> None:
    """`state` into a module built from the checkpoint's own description (state.pt); `where`
    names the file (and task) in the error."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise InputError(f"{where}: does not fit the model described in {STATE_FILE} ({detail})") from None


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
    """A state dict file into a module built from the checkpoint's own description (state.pt)."""
    load_state_dict(module, load_file(path), path)


def plan_text(plan: dict) -> str:
    """The run's plan as state.pt holds it: JSON text, made once a run. The plan carries every
    task's preprocessing, and `torch.save` walks a nested dict object by object (36 ms a save
    for 3,000 tasks' plan, at every checkpoint); one string it writes at once."""
    return json.dumps(plan)


def load_state(directory: str) -> dict:
    """state.pt, its plan as a dict (saved as `plan_text`, or as the dict itself before)."""
    state = load_file(os.path.join(directory, STATE_FILE))
    if isinstance(state.get("plan"), str):
        state["plan"] = json.loads(state["plan"])
    return state


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The checkpoint `--resume` continues from: the newest that Ray Train registered in its
    snapshot, written only once a checkpoint is complete, so a partial upload (a full disk, a
    killed worker) is never taken for one. Ray rewrites that snapshot in place, so a full disk
    can leave it truncated: then the newest local checkpoint whose files are all whole.
    Any pyarrow filesystem URI, or a local path."""
    import pyarrow.fs

    scheme = storage_path.split("://")[0] + "://" if "://" in storage_path else ""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path) if scheme else (pyarrow.fs.LocalFileSystem(), storage_path)
    try:
        with fs.open_input_stream(f"{root}/{run_name}/{compat.RAY_CHECKPOINT_SNAPSHOT}") as f:
            name = compat.latest_checkpoint_dir_name(f.read().decode())
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
        present = os.listdir(directory)
        ranked = [n for n in present if n.startswith(TASKS_PREFIX)]
        files = [STATE_FILE, TRUNK_FILE] + (ranked or [task_file(t["name"]) for t in plan.get("tasks", [])])
        files += [SHARED_HEADS_FILE] if SHARED_HEADS_FILE in present else []
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
    probe = os.path.join(storage_path, f".mtml_write_probe-{uuid.uuid4().hex}")  # runs at once: one probe each
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
