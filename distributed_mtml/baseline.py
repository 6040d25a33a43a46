"""The trivial predictor beside every model number: what knowing only the train split's labels
scores. A model that does not beat it has learned nothing usable from the features.

Regression: the train mean (so R^2 = 0 on train by construction, about 0 elsewhere).
Classification: the train split's class frequencies as a constant prediction: its accuracy is
the majority class's, its loss the class-prior log loss, its AUC 0.5 (all scores tie).
"""

from __future__ import annotations

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.suite import load_task
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.models import TaskShape
from distributed_mtml.metrics import task_metrics


def trivial_output(task: TaskShape, y_train: torch.Tensor, rows: int) -> torch.Tensor:
    """The constant prediction for `rows` rows, as the model's output would be (logits for
    classification, one column for regression)."""
    if task.type == "classification":
        counts = torch.bincount(y_train.long(), minlength=task.num_classes).double()
        prior = (counts / counts.sum()).clamp(min=1e-12)  # a class unseen in train: tiny, not zero
        return prior.log().expand(rows, -1)
    return y_train.double().mean().expand(rows, 1)


def baseline_metrics(suite_dir: str, splits: tuple[str, ...] = ("val", "test"),
                     preprocessing: dict[str, TaskPrep] | None = None) -> dict[str, float]:
    """`<split>/<task>/<metric>` of the trivial predictor fitted on each task's train split,
    on the scale of the model beside it (`preprocessing`: the model's, so losses compare)."""
    out: dict[str, float] = {}
    for spec in checked_suite(suite_dir).tasks:
        prep = (preprocessing or {}).get(spec.name) or TaskPrep()
        data = prep.apply(load_task(suite_dir, spec, prep.classes))
        task = TaskShape.of(data)
        y_train = torch.from_numpy(data.y["train"])
        for split in splits:
            y = torch.from_numpy(data.y[split])
            metrics = task_metrics(task, trivial_output(task, y_train, len(y)), y, prep)
            out.update({f"{split}/{spec.name}/{k}": v for k, v in metrics.items()})
    return out
