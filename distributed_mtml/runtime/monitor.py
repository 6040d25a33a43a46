"""Which epoch's model to keep, and when to stop: the monitored validation value.

Every rank computes the monitored value from the same full set of validation metrics, so every
rank makes the same keep/stop decision without a further collective. The state (best value,
its step, reports since) travels in each checkpoint's `state.pt`, so it survives `--resume` and
worker restarts. The driver keeps the model of the best checkpoint: Ray Train scores every
checkpoint by the value reported as `SCORE` and keeps the best `checkpoint.num_to_keep` (and
always the latest, which `--resume` needs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distributed_mtml.config import Config
from distributed_mtml.errors import InputError
from distributed_mtml.models import TaskShape
from distributed_mtml.per_task import split_key

SCORE = "mtml_monitor"  # the report key Ray Train's CheckpointConfig scores checkpoints by

TASK_METRICS = {"classification": ("loss", "accuracy", "auc"), "regression": ("loss", "mse", "mae", "r2")}


def mean_val_loss(metrics: dict[str, float]) -> float:
    """`val/mean_loss`: the mean of the tasks' validation losses, summed in name order so that
    every rank and the driver get the same float."""
    losses = [metrics[k] for k in sorted(metrics) if (split_key(k) or ("",))[0] == "val" and k.endswith("/loss")]
    return sum(losses) / len(losses)


def monitor_keys(tasks: list[TaskShape]) -> list[str]:
    """What a multi-task run reports for validation: the mean loss and every task's metrics."""
    return ["val/mean_loss"] + [f"val/{t.name}/{m}" for t in tasks for m in TASK_METRICS[t.type]]


def check_monitor(config: Config, known: list[str]) -> None:
    """`checkpoint.monitor` must be a value the run reports: bad input before Ray starts."""
    key = config.checkpoint.monitor
    if key not in known:
        raise InputError(f"checkpoint.monitor: '{key}' is not a validation value of this run "
                         f"(choose from: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''})")


@dataclass
class Monitor:
    key: str
    mode: str  # "min" or "max"
    patience: int | None  # reports without improvement before stopping; None: never stop early
    best: float | None = None
    best_step: int = -1
    since_best: int = 0

    @classmethod
    def of(cls, config: Config, saved: dict | None = None) -> "Monitor":
        """The run's monitor, with the state a checkpoint saved (if any)."""
        c = config.checkpoint
        return cls(c.monitor, c.mode, config.training.early_stopping_patience, **(saved or {}))

    def value(self, metrics: dict[str, float]) -> float:
        return mean_val_loss(metrics) if self.key == "val/mean_loss" else metrics[self.key]

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Records one report's value; True when it is the best so far."""
        value = self.value(metrics)
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps (plain numbers: loads with weights_only=True)."""
        return {k: v for k, v in asdict(self).items() if k in ("best", "best_step", "since_best")}

    def report_fields(self, metrics: dict[str, float]) -> dict[str, float]:
        """Keys without '/' (so not MLflow metrics) that the driver reads back from Ray's result."""
        return {SCORE: self.value(metrics), "best_step": self.best_step, "stopped_early": float(self.stop)}
