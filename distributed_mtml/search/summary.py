"""What a training search reports: the search trials by validation, and the best setting's
repeats with validation and test means and 95% intervals, as a table and as `search/results.csv`."""

from __future__ import annotations

import math

from distributed_mtml.runtime.monitor import mean_val_loss
from distributed_mtml.stats import mean_ci

HEADER = ["stage", "setting", "runs", "val mean", "val ci95", "test mean", "test ci95", "epochs", "seconds"]


def test_value(metrics: dict[str, float], monitor: str) -> float:
    """The test split's counterpart of the monitored validation value, from a finished run's
    metrics: `test/<task>/<metric>` for `val/<task>/<metric>`; for `val/mean_loss` the mean of
    the tasks' test losses (or their logged mean, `tasks/test/loss/mean`, where tasks are many)."""
    if monitor != "val/mean_loss":
        return metrics.get("test/" + monitor[len("val/"):], math.nan)
    if "tasks/test/loss/mean" in metrics:
        return metrics["tasks/test/loss/mean"]
    renamed = {"val/" + k[len("test/"):]: v for k, v in metrics.items() if k.startswith("test/")}
    return mean_val_loss(renamed) if renamed else math.nan


def search_rows(trials: list[dict], mode: str) -> list[list]:
    """One row per search trial (`trials`: setting, kept, epochs, seconds, stopped): those that
    ran to the end by their kept validation value, best first (`mode`: min or max), then those
    ASHA stopped (their value is from fewer epochs, and they are not chosen), then the failed."""
    def row(t: dict) -> list:
        stopped = " (stopped by ASHA)" if t["stopped"] else ""
        return ["search", t["setting"] + stopped, 1, t["kept"], math.nan, math.nan, math.nan, t["epochs"], t["seconds"]]

    sign = 1 if mode == "min" else -1
    return [row(t) for t in sorted(trials, key=lambda t: (math.isnan(t["kept"]), t["stopped"], sign * t["kept"]))]


def repeat_row(setting: str, val: list[float], test: list[float], seconds: list[float]) -> list:
    """The best setting's repeats: val and test mean with the half-width of their 95% interval."""
    return ["repeat", setting, len(val), *mean_ci(val), *mean_ci(test), math.nan, sum(seconds) / max(len(seconds), 1)]


def to_csv(rows: list[list]) -> str:
    return ",".join(HEADER) + "\n" + "".join(",".join(_csv_cell(v) for v in row) + "\n" for row in rows)


def _csv_cell(value) -> str:
    text = str(value)
    return f'"{text}"' if "," in text else text
