"""`scaling.num_workers: 0`: the training function in the command's own process.

Ray Train's local mode (a `TorchTrainer` with no workers) calls the training function in this
process, as a world of one: no controller, worker actors or placement group, and no Ray at all
unless a task is streamed. It keeps only the last report, in memory, and calls no callbacks.
`LocalRun` gives such a run what the controller gives a distributed one: each report logged to
MLflow by the same callback, each checkpoint copied to `checkpoint.dir` under the run's name
(the best `checkpoint.num_to_keep` by the monitored value, and the latest), and the latest
handed back on `--resume`.

The workers' code reports and asks for its checkpoint through `report` and `get_checkpoint`
here, which go to Ray Train unless a `LocalRun` is active in this process.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

from distributed_mtml.runtime.checkpoint import latest_checkpoint
from distributed_mtml.runtime.monitor import SCORE

RECORD = "local_checkpoints.json"  # [{dir, metrics}] of the checkpoints a local run kept

_active: "LocalRun | None" = None


class LocalRun:
    """The controller's part of a run in this process: metrics to the MLflow callback,
    checkpoints kept in `storage/name` and scored as Ray Train scores them."""

    def __init__(self, storage: str, name: str, callback, num_to_keep: int, mode: str):
        self.run_dir, self.callback, self.num_to_keep, self.mode = os.path.join(storage, name), callback, num_to_keep, mode
        self.storage, self.name = storage, name
        self.kept: list[dict] = self._recorded()
        self.last_metrics: dict = {}

    def _recorded(self) -> list[dict]:
        try:
            with open(os.path.join(self.run_dir, RECORD)) as f:
                return [k for k in json.load(f) if os.path.isdir(os.path.join(self.run_dir, k["dir"]))]
        except FileNotFoundError:
            return []

    def __enter__(self) -> "LocalRun":
        global _active
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    def report(self, metrics: dict, checkpoint_dir: str | None, dir_name: str | None) -> None:
        if checkpoint_dir is not None:
            self._keep(checkpoint_dir, dir_name, metrics)
        self.last_metrics = metrics
        self.callback.after_report(None, [metrics], None)

    def _keep(self, source: str, dir_name: str, metrics: dict) -> None:
        """Copies the checkpoint in, then drops those neither among the best nor the latest."""
        os.makedirs(self.run_dir, exist_ok=True)
        shutil.copytree(source, os.path.join(self.run_dir, dir_name), dirs_exist_ok=True)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.kept = [k for k in self.kept if k["dir"] != dir_name] + [{"dir": dir_name, "metrics": scalars}]
        keep = {k["dir"] for k in self._best()} | {dir_name}
        for k in self.kept:
            if k["dir"] not in keep:
                shutil.rmtree(os.path.join(self.run_dir, k["dir"]), ignore_errors=True)
        self.kept = [k for k in self.kept if k["dir"] in keep]
        with open(os.path.join(self.run_dir, RECORD), "w") as f:
            json.dump(self.kept, f)

    def _best(self) -> list[dict]:
        sign = 1 if self.mode == "min" else -1
        scored = [k for k in self.kept if SCORE in k["metrics"]]
        return sorted(scored, key=lambda k: sign * k["metrics"][SCORE])[: self.num_to_keep]

    def latest(self):
        import ray.train

        path = latest_checkpoint(self.storage, self.name)
        return ray.train.Checkpoint.from_directory(path) if path else None

    def result(self) -> SimpleNamespace:
        """What the driver reads of Ray Train's `Result`: the last report's metrics, the latest
        checkpoint and the kept ones with their metrics."""
        import ray.train

        best = [(ray.train.Checkpoint.from_directory(os.path.join(self.run_dir, k["dir"])), k["metrics"])
                for k in self.kept]
        return SimpleNamespace(metrics=self.last_metrics, checkpoint=self.latest(), best_checkpoints=best)


def rank_and_world() -> tuple[int, int]:
    """(this worker's rank, the group's size) from Ray Train's context, or (0, 1) in a local
    run: inside a Tune trial (a training search), Ray Train's context is Tune's to give."""
    if _active is not None:
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def device():
    """`ray.train.torch.get_device()`, or in a local run what it gives a process Ray assigned no
    GPU: the first GPU where there is one, else the CPU."""
    import torch

    if _active is not None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def report(metrics: dict, checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
    """`ray.train.report`, or the active local run's."""
    if _active is not None:
        return _active.report(metrics, checkpoint_dir, dir_name)
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)


def get_checkpoint():
    """`ray.train.get_checkpoint()`, or the active local run's latest (a resumed run's)."""
    if _active is not None:
        return _active.latest()
    import ray.train

    return ray.train.get_checkpoint()
