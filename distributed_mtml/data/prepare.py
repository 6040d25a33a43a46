"""What turns a task's raw rows into model inputs, and model outputs back into the task's units.

Real tables come in raw units (a blood pressure next to a 0/1 flag, a price in the thousands);
an MLP trained on them learns slowly and a loss in squared thousands drowns every other task's in
`val/mean_loss`. So by default every feature, and a regression target, is standardised with the
train split's mean and standard deviation: statistics of train only, so val and test never shape
the model. The statistics travel in the run's plan and with the saved model, so evaluation,
transfer and prediction apply exactly the transform training used. Metrics are reported in the
target's own units; losses stay standardised so that tasks weigh alike in their mean.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from distributed_mtml.data.scan import Moments, TaskScan
from distributed_mtml.data.suite import TaskData


class TaskPrep(BaseModel):
    """One task's preprocessing: feature and target statistics of its train split (None and
    0/1: left as they are) and its class names (string labels; class k is `classes[k]`)."""

    model_config = ConfigDict(extra="forbid")

    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: list[str] | None = None

    @classmethod
    def fit(cls, data: TaskData, standardize: bool = True) -> "TaskPrep":
        """The train split's statistics (`standardize` off: only the class names)."""
        y = data.y["train"] if data.spec.type == "regression" else None
        return cls.of_rows(data.x["train"], y, data.classes, standardize)

    @classmethod
    def of_rows(cls, x: np.ndarray, y: np.ndarray | None, classes: list[str] | None = None,
                standardize: bool = True) -> "TaskPrep":
        """The statistics of rows `x` and a regression target `y` (None: classification)."""
        xm, ym = Moments(x.shape[1]), None
        xm.add(x)
        if y is not None:
            ym = Moments(1)
            ym.add(y)
        return cls.of_moments(xm, ym, classes, standardize)

    @classmethod
    def of_scan(cls, scan: TaskScan, standardize: bool = True) -> "TaskPrep":
        """The same statistics, from a streamed pass over the task's file."""
        return cls.of_moments(scan.x, scan.y, scan.class_names(), standardize)

    @classmethod
    def of_moments(cls, x: Moments, y: Moments | None, classes: list[str] | None, standardize: bool) -> "TaskPrep":
        if not standardize:
            return cls(classes=classes)
        prep = cls(feature_mean=x.mean.tolist(), feature_std=x.std().tolist(), classes=classes)
        if y is not None:
            prep.target_mean, prep.target_std = float(y.mean[0]), float(y.std()[0])
        return prep

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """Raw feature rows [N, F] -> what the model takes."""
        if self.feature_mean is None:
            return x
        mean, std = np.asarray(self.feature_mean), np.asarray(self.feature_std)
        return ((x - mean) / std).astype(np.float32)

    def input_column(self, i: int, values: np.ndarray) -> np.ndarray:
        """Feature `i` of raw rows (float32) as the model takes it: `inputs` one column at a time,
        with the same float64 arithmetic, so a streamed window is prepared without float64
        copies of the whole window."""
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


def prepared(data: TaskData, standardize: bool) -> tuple[TaskData, TaskPrep]:
    """`data` standardised by its own train split, and the statistics used."""
    prep = TaskPrep.fit(data, standardize)
    return prep.apply(data), prep
