"""`mtml evaluate`: per-task test metrics of a trained model on a suite."""

from __future__ import annotations

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.suite import load_task
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.errors import InputError
from distributed_mtml.models import MultiTaskModel
from distributed_mtml.metrics import task_metrics


def evaluate(model: MultiTaskModel, suite_dir: str, split: str = "test") -> dict[str, float]:
    """Metrics `<split>/<task>/<metric>` for every suite task the model has a head for."""
    spec = checked_suite(suite_dir)
    known = [t for t in spec.tasks if t.name in model.tasks]
    if not known:
        raise InputError(f"{suite_dir}: none of its tasks {[t.name for t in spec.tasks]} has a head in the model")
    out: dict[str, float] = {}
    with torch.no_grad():
        for task in known:
            prep = model.preprocessing.get(task.name) or TaskPrep()  # training's statistics, not this suite's
            data = prep.apply(load_task(suite_dir, task, prep.classes))
            x, y = torch.from_numpy(data.x[split]), torch.from_numpy(data.y[split])
            metrics = task_metrics(model.tasks[task.name], model(task.name, x), y, prep)
            out.update({f"{split}/{task.name}/{k}": v for k, v in metrics.items()})
    return out
