"""Per-task metrics when tasks are many: summaries for MLflow, every value in a Parquet table.

A run of 1,000 tasks logged 17,000 metric keys: the MLflow run page took 89 s to show them and
then stopped answering, and writing them was a third of the run's time. A regression task adds
17 keys to a run (`keys_of`), so a run page stays under 100 keys only while its per-task keys
are at most `TASK_KEYS` (five regression tasks are past it). Beyond that (or above
`tracking.task_metrics_limit` tasks, where a user sets it), each per-task key (`val/<task>/loss`) is folded into the
summaries a user reads across tasks, `tasks/val/loss/<stat>` with the stats below, and the
values themselves go to a Parquet table artifact (`per_task/<name>.parquet`: a row per task, a
column per `<prefix>/<metric>`), which pandas or the MLflow UI's artifact view reads.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from distributed_mtml.metrics import METRICS

PREFIXES = ("baseline/val/", "baseline/test/", "cross_stitch/", "aggregation/", "train/", "gates/", "val/", "test/")
STATS = ("mean", "median", "p10", "p90", "worst")
HIGHER_IS_BETTER = ("accuracy", "auc", "r2")
TABLE_DIR = "per_task"
TASK_KEYS = 80  # the most per-task keys a run logs one by one; its run-level keys are under 20: a page of <= 100
PRINTED_TASKS = 50  # up to this many tasks the console prints a row per task (without a limit set)


def keys_of(task_type: str, weighted: bool) -> int:
    """The metric keys one task adds to a training run: its train loss, its val and test loss and
    metrics, the same two for the baseline, and its aggregation weight (`weighted`)."""
    return 1 + 4 * (1 + len(METRICS[task_type])) + int(weighted)


def folds(tasks: int, keys: int, limit: int | None) -> bool:
    """Whether a run of `tasks` tasks making `keys` per-task keys logs summaries and tables
    instead: above `limit` tasks where the user set one, else above `TASK_KEYS` keys."""
    return tasks > limit if limit is not None else keys > TASK_KEYS


def printed_in_full(tasks: int, limit: int | None) -> bool:
    """Whether the console shows a row per task (a terminal holds more rows than a run page holds keys)."""
    return tasks <= (limit if limit is not None else PRINTED_TASKS)


def split_key(key: str) -> tuple[str, str, str] | None:
    """`val/<task>/loss` -> ("val", task, "loss"); None for a run-level key (`val/mean_loss`).
    A task name may hold '/': the metric is the last part."""
    for prefix in PREFIXES:
        if key.startswith(prefix) and "/" in key[len(prefix):]:
            task, metric = key[len(prefix):].rsplit("/", 1)
            return prefix.rstrip("/"), task, metric
    return None


def summary_key(prefix: str, metric: str, stat: str) -> str:
    """`tasks/val/loss/mean`: the stat across tasks of `val/<task>/loss` (not a per-task key)."""
    return f"tasks/{prefix}/{metric}/{stat}"


def task_count(metrics: dict[str, float]) -> int:
    return len({parts[1] for parts in map(split_key, metrics) if parts is not None})


def worst(metric: str, values: np.ndarray) -> float:
    """The worst task's value: the lowest accuracy, AUC or R^2, the highest loss or error."""
    return float(np.nanmin(values) if metric in HIGHER_IS_BETTER else np.nanmax(values))


def summarize(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(run-level keys and the per-task keys' summaries `tasks/<prefix>/<metric>/<stat>`,
    task -> its values as `<prefix>/<metric>`)."""
    kept: dict[str, float] = {}
    columns: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        parts = split_key(key)
        if parts is None:
            kept[key] = value
        else:
            prefix, task, metric = parts
            columns.setdefault((prefix, metric), {})[task] = value
    rows: dict[str, dict[str, float]] = {}
    for (prefix, metric), by_task in columns.items():
        values = np.array(list(by_task.values()), dtype=np.float64)
        if np.isnan(values).all():
            continue
        stats = {"mean": np.nanmean(values), "median": np.nanmedian(values), "p10": np.nanpercentile(values, 10),
                 "p90": np.nanpercentile(values, 90), "worst": worst(metric, values)}
        kept.update({summary_key(prefix, metric, s): float(stats[s]) for s in STATS})
        for task, value in by_task.items():
            rows.setdefault(task, {})[f"{prefix}/{metric}"] = value
    return kept, rows


def write_table(rows: dict[str, dict[str, float]], path: str) -> None:
    """`rows` (task -> column -> value) as a Parquet file: a row per task, a column per metric."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tasks = sorted(rows)
    names = sorted({c for row in rows.values() for c in row})
    pq.write_table(pa.table({"task": tasks, **{c: [rows[t].get(c, float("nan")) for t in tasks] for c in names}}), path)


def log_table(client, run_id: str, rows: dict[str, dict[str, float]], name: str) -> None:
    """`rows` as the run's artifact `per_task/<name>.parquet`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.parquet")
        write_table(rows, path)
        client.log_artifact(run_id, path, TABLE_DIR)


def ranked(rows: dict[str, dict[str, float]], column: str, metric: str, count: int) -> tuple[list, list]:
    """(the `count` worst tasks, the `count` best) by `column`, as (task, value) pairs."""
    pairs = [(t, r[column]) for t, r in rows.items() if column in r and not np.isnan(r[column])]
    pairs.sort(key=lambda p: p[1], reverse=metric not in HIGHER_IS_BETTER)  # worst first
    return pairs[:count], pairs[::-1][:count]
