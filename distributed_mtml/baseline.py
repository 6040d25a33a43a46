"""The trivial predictor beside every model number: what knowing only the train split's labels
scores. A model that does not beat it has learned nothing usable from the features.

Regression: the train mean (so R^2 = 0 on train by construction, about 0 elsewhere).
Classification: the train split's class frequencies as a constant prediction: its accuracy is
the majority class's, its loss the class-prior log loss, its AUC 0.5 (all scores tie).
"""

from __future__ import annotations

from typing import Iterable

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import Moments
from distributed_mtml.data.stream import tasks_split_batches
from distributed_mtml.data.tasks import load_suite_spec
from distributed_mtml.data.validate import checked_scans
from distributed_mtml.evaluate import tasks_metrics
from distributed_mtml.models import TaskShape


def trivial_output(task: TaskShape, train_targets: Iterable[torch.Tensor]) -> torch.Tensor:
    """The constant prediction, one row as the model's output would be (logits for
    classification, one column for regression), from the train split's targets in batches."""
    if task.type == "classification":
        counts = sum(torch.bincount(y.long(), minlength=task.num_classes).double() for y in train_targets)
        prior = (counts / counts.sum()).clamp(min=1e-12)  # a class unseen in train: tiny, not zero
        return prior.log().unsqueeze(0)
    moments = Moments(1)
    for y in train_targets:
        moments.add(y.double().numpy())
    return torch.tensor([[moments.mean[0]]], dtype=torch.float64)


def baseline_metrics(suite_dir: str, splits: tuple[str, ...] = ("val", "test"),
                     preprocessing: dict[str, TaskPrep] | None = None,
                     shapes: dict[str, TaskShape] | None = None) -> dict[str, float]:
    """`<split>/<task>/<metric>` of the trivial predictor fitted on each task's train split,
    on the scale of the model beside it (`preprocessing`: the model's, so losses compare).
    Only target columns are read, a batch at a time. `shapes`: the tasks' shapes when the caller
    has checked the suite already (the end of a run), which saves a pass over every file."""
    out: dict[str, float] = {}
    if shapes is None:
        spec, scans = checked_scans(suite_dir, impute=True)  # features are not read
        shapes = {t.name: TaskShape.of_scan(scans[t.name]) for t in spec.tasks}
    else:
        spec = load_suite_spec(suite_dir)
    preps = {t.name: (preprocessing or {}).get(t.name) or TaskPrep() for t in spec.tasks}
    targets: dict[str, list[torch.Tensor]] = {t.name: [] for t in spec.tasks}
    for name, (_, y) in tasks_split_batches(suite_dir, spec.tasks, "train", preps, features=False):
        targets[name].append(y)
    constant = {name: trivial_output(shapes[name], ys) for name, ys in targets.items()}
    for split in splits:
        batches = tasks_split_batches(suite_dir, spec.tasks, split, preps, features=False)
        found = tasks_metrics({t.name: shapes[t.name] for t in spec.tasks}, preps, batches,
                              lambda name, x: constant[name].expand(len(x), -1))
        out.update({f"{split}/{name}/{k}": v for name, metrics in found.items() for k, v in metrics.items()})
    return out
