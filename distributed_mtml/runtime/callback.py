"""The controller-side MLflow writer of a training run, and what keeps metrics through an outage.

Ray Train runs `MLflowMetricsCallback` in its controller process: every report of every worker
is merged into one step and logged there, so workers never write to MLflow (SQLite allows one
writer). A tracking server that stops answering does not stop training: reports wait in a
`MetricSpool` file and are sent when it answers again, or by the driver at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from typing import Any, Callable

from ray.train import UserCallback

from distributed_mtml import compat, console, per_task
from distributed_mtml.console import say
from distributed_mtml.runtime.monitor import mean_val_loss
from distributed_mtml.tracking import Tracker

log = logging.getLogger(__name__)


def merge_worker_metrics(
    per_worker: list[dict[str, float]], counter: str = "epoch"
) -> tuple[int, dict[str, float]]:
    """One report's metrics of all ranks -> (its `counter` value: the epoch, or the
    meta-iteration, MLflow metrics with run-level aggregates).

    Workers run in lock-step, so the slowest rank's train time is the report's wall time.
    """
    epoch = int(per_worker[0][counter])
    merged: dict[str, float] = {}
    for m in per_worker:
        merged.update({k: v for k, v in m.items() if "/" in k})  # ranks own disjoint keys, or agree
    seconds = max(m["train_seconds"] for m in per_worker)
    merged["throughput/samples_per_s"] = sum(m["samples"] for m in per_worker) / max(seconds, 1e-9)
    merged["system/workers"] = len(per_worker)  # one report per rank: an elastic group's size
    merged["val/mean_loss"] = mean_val_loss(merged)
    return epoch, merged


def progress_line(epoch: int, epochs: int, metrics: dict[str, float], counter: str = "epoch") -> str:
    done = epoch + 1 if counter == "epoch" else epoch  # epochs count from 0, iterations done from 1
    parts = [f"val/mean_loss {metrics['val/mean_loss']:.4f}"]
    keys = {k: per_task.split_key(k) for k in sorted(metrics)}
    scores = [(key[1], key[2], metrics[k]) for k, key in keys.items()
              if key is not None and key[0] == "val" and key[2] in ("accuracy", "r2")]
    parts += _task_parts(scores)
    unit = "samples" if counter == "epoch" else "tasks"
    parts.append(f"{metrics['throughput/samples_per_s']:.0f} {unit}/s")
    return console.progress_line(counter, done, epochs, parts)


SHOWN_TASKS = 8  # beyond this many task metrics, one line per task would not be a line


def _task_parts(per_task: list[tuple[str, str, float]]) -> list[str]:
    """Each task's accuracy or r2; with many tasks, each metric's median and range instead."""
    if len(per_task) <= SHOWN_TASKS:
        return [f"{task} {metric} {v:.4f}" for task, metric, v in per_task]
    parts = []
    for metric in sorted({m for _, m, _ in per_task}):
        values = sorted(v for _, m, v in per_task if m == metric)
        parts.append(f"{metric} median {statistics.median(values):.4f} (min {values[0]:.4f}, max {values[-1]:.4f}, {len(values)} tasks)")
    return parts


def worker_error_summary(worker_exceptions: dict[int, BaseException]) -> str:
    """'rank 1: <its error>' per failed rank: the last line of each, cut at 200 characters (Ray
    wraps a worker's exception in its traceback text, whose last line is the exception itself)."""
    parts = []
    for rank, e in sorted(worker_exceptions.items()):
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        parts.append(f"rank {rank}: {lines[-1][:200]}")
    return "; ".join(parts)


@contextlib.contextmanager
def fail_fast():
    """MLflow's HTTP client without its retries (seven, with exponential backoff): for callers
    that keep what failed and try again themselves."""
    with compat.environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        yield


class MetricSpool:
    """Reports the tracking server did not take, in order. Kept in memory while it answers;
    `save` mirrors them to a local JSON-lines file when it does not, so that nothing is lost if
    the run ends before it returns. Each keeps its original timestamp, so that sending it again
    is the same metric, not a second one."""

    def __init__(self, path: str):
        self.path, self.reports = path, []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.reports.append({"step": step, "timestamp_ms": int(time.time() * 1000), "metrics": metrics})

    def send(self, tracker: Tracker, run_id: str) -> None:
        """Logs what is kept, oldest first, dropping each once the server took it; raises on
        the first that fails. When all went, the local copy is no longer needed."""
        while self.reports:
            r = self.reports[0]
            tracker.log_metrics(run_id, r["metrics"], r["step"], r["timestamp_ms"])
            self.reports.pop(0)
        if os.path.exists(self.path):
            os.remove(self.path)

    def save(self) -> None:
        import json

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.reports)
        os.replace(self.path + ".tmp", self.path)

    @classmethod
    def load(cls, path: str) -> "MetricSpool":
        import json

        spool = cls(path)
        if os.path.exists(path):
            with open(path) as f:
                spool.reports = [json.loads(line) for line in f if line.strip()]
        return spool


def spool_path(storage_path: str, ray_name: str) -> str:
    """Beside the run's checkpoints when they are local, else in the working directory."""
    base = storage_path if "://" not in storage_path else os.path.abspath("mtml_runs")
    return os.path.join(base, ray_name, "unlogged_metrics.jsonl")


class MLflowMetricsCallback(UserCallback):
    """Logs every report of every worker to one MLflow run, from the controller process, and
    records worker failures: each one the trainer will restart from the last checkpoint is
    counted in the tag `mtml.restarts` and the metric `system/restarts`. Each phase of the
    run with one placement of tasks on workers (an elastic run has one per group size) is
    recorded in the artifact `placement/phases.json`.

    A tracking server that stops answering does not stop training: the report is kept in a
    `MetricSpool` and sent before the next one; the driver sends what is left at the end."""

    def __init__(self, tracker: Tracker, run_id: str, epochs: int, counter: str, max_failures: int, spool: str,
                 terminal: str | None = None, fold: bool = False, on_epoch: Callable[[dict], None] | None = None):
        self.tracker, self.run_id, self.epochs, self.counter, self.terminal = tracker, run_id, epochs, counter, terminal
        self.fold, self.on_epoch = fold, on_epoch  # on_epoch: rank 0's metrics of each epoch (a search trial's report)
        self.max_failures, self.failures, self.next_step = max_failures, 0, 0
        self.spool = MetricSpool(spool)
        self.phases: list[dict] = []

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        """One report of every rank: each epoch it covers (a train report carries the epochs
        since the last one under "epochs") logged at its own step; one progress line."""
        per_rank = [m.get("epochs") or [m] for m in metrics]
        self._record_placement(int(per_rank[0][0][self.counter]), [m.get("holds", []) for m in metrics])
        for covered in zip(*per_rank):
            epoch, merged = merge_worker_metrics(list(covered), self.counter)
            self._log(self._folded(merged, epoch), epoch)
            if self.on_epoch is not None:
                self.on_epoch(covered[0])
        self.next_step = epoch + 1
        say(progress_line(epoch, self.epochs, merged, self.counter), self.terminal)

    def _folded(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """With `fold` (many tasks): the per-task keys' summaries, their values in the table
        `per_task/<counter>_<step>.parquet` (see `per_task`)."""
        if not self.fold:
            return metrics
        summary, rows = per_task.summarize(metrics)
        try:
            with fail_fast():
                per_task.log_table(self.tracker.client(), self.run_id, rows, f"{self.counter}_{step:06d}")
        except Exception as e:  # noqa: BLE001 - a table, not worth stopping training for
            log.warning("per-task table of %s %d not logged: %s", self.counter, step, str(e).splitlines()[0][:160])
        return summary

    def _record_placement(self, step: int, holds: list[list[str]]) -> None:
        """A new phase when the ranks hold other tasks than in the last report (a resumed run
        continues the record it left)."""
        workers = {str(r): h for r, h in enumerate(holds)}
        if not self.phases:
            self.phases = self._logged_phases()
        if self.phases and self.phases[-1]["workers"] == workers:
            return
        if self.phases:
            said = "; ".join(f"rank {r}: {', '.join(h)}" for r, h in workers.items())
            say(f"[mtml] now {len(holds)} worker(s) from {self.counter} {step}: {said}", self.terminal)
        self.phases.append({"from_" + self.counter: step, "num_workers": len(holds), "workers": workers})
        try:
            with fail_fast():
                self.tracker.client().log_dict(self.run_id, {"phases": self.phases}, "placement/phases.json")
        except Exception as e:  # noqa: BLE001 - a record, not worth stopping training for
            log.warning("placement record not logged: %s", str(e).splitlines()[0][:160])

    def _logged_phases(self) -> list[dict]:
        import json
        import tempfile

        try:
            with fail_fast(), tempfile.TemporaryDirectory() as d:
                path = self.tracker.client().download_artifacts(self.run_id, "placement/phases.json", d)
                with open(path) as f:
                    return json.load(f)["phases"]
        except Exception:  # noqa: BLE001 - none yet (a new run), or not readable: start the record
            return []

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.spool.add(step, metrics)
        try:
            with fail_fast():  # MLflow's own retries would hold every worker at the next report for minutes
                self.spool.send(self.tracker, self.run_id)
        except Exception as e:  # noqa: BLE001 - whatever the client raises, training goes on
            self.spool.save()
            reason = str(e).splitlines()[0][:160]
            message = (f"tracking server not answering ({reason}); {len(self.spool.reports)} "
                       f"report(s) kept in {self.spool.path}, sent when it answers")
            log.warning(message)  # the controller's log, in Ray's session logs
            say(f"[mtml] warning: {message}", self.terminal)  # the user's terminal

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        what = worker_error_summary(worker_exceptions)
        c = self.tracker.client()
        c.set_tag(self.run_id, "mtml.last_worker_error", what[:5000])
        if self.max_failures != -1 and self.failures > self.max_failures:
            return  # no restart left: the driver reports the failure
        c.set_tag(self.run_id, "mtml.restarts", str(self.failures))
        self.tracker.log_metrics(self.run_id, {"system/restarts": self.failures}, step=self.next_step)
        say(f"[mtml] worker failure ({what}): restart {self.failures} from the last checkpoint", self.terminal)
