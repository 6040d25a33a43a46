"""What turns a task's raw rows into model inputs, and model outputs back into the task's units.

Real tables come in raw units (a blood pressure next to a 0/1 flag, a price in the thousands);
an MLP trained on them learns slowly and a loss in squared thousands drowns every other task's in
`val/mean_loss`. So by default every feature, and a regression target, is standardised with
train-split means and standard deviations: statistics of train only, so val and test never shape
the model. The statistics travel in the run's plan and with the saved model, so evaluation,
transfer and prediction apply exactly the transform training used. Metrics are reported in the
target's own units; losses stay standardised so that tasks weigh alike in their mean.

Whose statistics (`data.standardize`): `suite` (the default) pools a column's train rows over
every task that reads it. Per-task statistics (`task`) would centre a feature that is constant
within a task (a school's size, a region) to 0 in every task, so the model never sees it, and
would centre each task's target on its own mean of a few dozen rows: an intercept per task with
no shrinkage toward the others. On many small related tasks that loses to a pooled Ridge.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from distributed_mtml.data.scan import Moments, TaskScan, is_numeric
from distributed_mtml.data.suite import TaskData
from distributed_mtml.errors import InputError


class TaskPrep(BaseModel):
    """One task's preprocessing: what fills a missing feature value (`data.impute: mean`: the
    train mean; None: nothing is filled), feature and target statistics of its train split (None
    and 0/1: left as they are) and its class names (string labels; class k is `classes[k]`)."""

    model_config = ConfigDict(extra="forbid")

    feature_fill: list[float] | None = None
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: list[str] | None = None

    @classmethod
    def fit(cls, data: TaskData, standardize: bool = True, impute: bool = False) -> "TaskPrep":
        """The train split's statistics (`standardize` off: only the class names)."""
        y = data.y["train"] if data.spec.type == "regression" else None
        return cls.of_rows(data.x["train"], y, data.classes, standardize, impute)

    @classmethod
    def of_rows(cls, x: np.ndarray, y: np.ndarray | None, classes: list[str] | None = None,
                standardize: bool = True, impute: bool = False) -> "TaskPrep":
        """The statistics of rows `x` and a regression target `y` (None: classification)."""
        xm, ym = Moments(x.shape[1]), None
        xm.add(x)
        if y is not None:
            ym = Moments(1)
            ym.add(y)
        return cls.of_moments(xm, ym, classes, standardize, impute)

    @classmethod
    def of_scan(cls, scan: TaskScan, standardize: bool = True, impute: bool = False) -> "TaskPrep":
        """The same statistics, from a streamed pass over the task's file."""
        return cls.of_moments(scan.x, scan.y, scan.class_names(), standardize, impute)

    @classmethod
    def of_moments(cls, x: Moments, y: Moments | None, classes: list[str] | None, standardize: bool,
                   impute: bool = False) -> "TaskPrep":
        prep = cls(classes=classes, feature_fill=x.mean.tolist() if impute else None)
        if not standardize:
            return prep
        prep.feature_mean, prep.feature_std = x.mean.tolist(), x.std().tolist()
        if y is not None:
            prep.target_mean, prep.target_std = float(y.mean[0]), float(y.std()[0])
        return prep

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """Raw feature rows [N, F] -> what the model takes."""
        if self.feature_fill is not None:
            x = np.where(np.isnan(x), np.asarray(self.feature_fill, dtype=x.dtype), x)
        if self.feature_mean is None:
            return x
        mean, std = np.asarray(self.feature_mean), np.asarray(self.feature_std)
        return ((x - mean) / std).astype(np.float32)

    def input_column(self, i: int, values: np.ndarray) -> np.ndarray:
        """Feature `i` of raw rows (float32) as the model takes it: `inputs` one column at a time,
        with the same float64 arithmetic, so a streamed window is prepared without float64
        copies of the whole window."""
        if self.feature_fill is not None:
            values = np.where(np.isnan(values), np.float32(self.feature_fill[i]), values)
        if self.feature_mean is None:
            return values
        return (values.astype(np.float64) - self.feature_mean[i]) / self.feature_std[i]

    def scaled_target(self, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """A regression target in the units the model is trained on (class indices untouched)."""
        floating = y.dtype.is_floating_point if isinstance(y, torch.Tensor) else y.dtype.kind == "f"
        if not floating:
            return y
        out = (y - self.target_mean) / self.target_std
        return out.float() if isinstance(out, torch.Tensor) else out.astype(np.float32)

    def with_target_of(self, y: torch.Tensor) -> "TaskPrep":
        """These statistics with the regression target's taken from `y` alone (a transfer fit
        on K labelled rows may know no other labels)."""
        if self.feature_mean is None or not y.dtype.is_floating_point:
            return self
        moments = Moments(1)
        moments.add(y.double().numpy())
        return self.model_copy(update={"target_mean": float(moments.mean[0]), "target_std": float(moments.std()[0])})

    def target_units(self, values: torch.Tensor) -> torch.Tensor:
        """Model-scale regression values (predictions or targets) back in the target's units."""
        return values * self.target_std + self.target_mean

    def apply(self, data: TaskData) -> TaskData:
        """Every split of `data` as the model sees it."""
        return replace(data, x={s: self.inputs(v) for s, v in data.x.items()},
                       y={s: self.scaled_target(v) for s, v in data.y.items()})


def pooled_moments(scans: Iterable[TaskScan]) -> tuple[dict[str, Moments], dict[str, Moments]]:
    """Train-split moments per feature column and per regression target column, each pooled
    over every task that reads that column (`Moments.merge`: no row is read again)."""
    columns: dict[str, Moments] = {}
    targets: dict[str, Moments] = {}
    for scan in scans:
        for i, column in enumerate(scan.usable_features()):
            columns.setdefault(column, Moments(1)).merge(scan.x.column(i))
        if scan.y is not None:
            targets.setdefault(scan.task.target, Moments(1)).merge(scan.y)
    return columns, targets


def plan_preprocessing(scans: dict[str, TaskScan], mode: str, impute: bool = False) -> dict[str, TaskPrep]:
    """Every task's preprocessing under `data.standardize` = `mode` (suite | task | off);
    `impute`: a missing feature value is filled with the train mean of the same rows whose
    statistics standardise it (the task's own under `task` and `off`)."""
    if mode != "suite":
        return {name: TaskPrep.of_scan(scan, mode == "task", impute) for name, scan in scans.items()}
    _check_columns_agree(scans)
    columns, targets = pooled_moments(scans.values())
    preps = {}
    for name, scan in scans.items():
        stats = [columns[c] for c in scan.usable_features()]
        means = [float(m.mean[0]) for m in stats]
        prep = TaskPrep(feature_mean=means, feature_std=[float(m.std()[0]) for m in stats],
                        feature_fill=means if impute else None, classes=scan.class_names())
        if scan.y is not None:
            target = targets[scan.task.target]
            prep.target_mean, prep.target_std = float(target.mean[0]), float(target.std()[0])
        preps[name] = prep
    return preps


def _check_columns_agree(scans: dict[str, TaskScan]) -> None:
    """`suite` pools a column over every task that names it, which assumes the name means one
    quantity: a column that is a numeric feature of one task and text in another is an error
    naming both, not a feature silently left out of one of them."""
    numeric = {c: name for name, scan in scans.items() for c in scan.usable_features()}
    for name, scan in scans.items():
        if scan.task.features is not None:  # listed features: a text one is already an error naming it
            continue
        for column, typ in scan.types.items():
            if column in numeric and column not in (scan.task.target, scan.task.split_column) and not is_numeric(typ):
                raise InputError(f"{scan.where}: column '{column}' is {typ} in task '{name}' and a numeric feature of task "
                                 f"'{numeric[column]}'; data.standardize: suite pools a column over the tasks that read it, "
                                 "so it must be numeric in each (or list each task's features, or data.standardize: task)")


def standardizes(mode: str | bool) -> bool:
    """Whether `data.standardize` (a mode, or the true/false of older saved plans) transforms
    at all."""
    return mode not in ("off", False)


def prepared(data: TaskData, mode: str | bool, impute: bool = False) -> tuple[TaskData, TaskPrep]:
    """`data` standardised by its own train split (one task alone is its own pool: `suite` and
    `task` agree), and the statistics used."""
    prep = TaskPrep.fit(data, standardizes(mode), impute)
    return prep.apply(data), prep
