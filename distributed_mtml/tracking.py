"""MLflow: where runs go, how they are named, and the one process that writes them.

SQLite allows one writer at a time, so workers never talk to MLflow. The driver creates
the run and logs params and artifacts; during training a Ray Train `UserCallback`, which
runs in the controller process, logs every worker's metrics. The two never overlap.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from ray.train import UserCallback

from distributed_mtml.console import say
from distributed_mtml.interrupts import uninterrupted
from distributed_mtml.runtime.monitor import mean_val_loss

DEFAULT_DB = "mlflow.db"


def default_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """--tracking-uri, then the config, then $MLFLOW_TRACKING_URI, then ./mlflow.db.

    SQLite paths are made absolute here because Ray workers and the controller run in
    other working directories. Pure: no I/O.
    """
    uri = cli_uri or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    elif "://" not in uri:
        uri = "sqlite:///" + os.path.abspath(uri)
    return uri


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """The tracking URI a command will use, checked to answer when it is a server."""
    uri = default_tracking_uri(cli_uri, config_uri)
    check_reachable(uri)
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer is bad input: say so before anything starts."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from distributed_mtml.errors import InputError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"--tracking-uri {uri}: the MLflow server does not answer ({reason})") from None


def check_store_exists(uri: str) -> None:
    """Reading runs from a SQLite file that is not there would create an empty one: say where
    none was found instead."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        from distributed_mtml.errors import InputError

        raise InputError(f"--tracking-uri: no MLflow database at {uri[len('sqlite:///'):]} "
                         "(pass --tracking-uri where the run was logged)")


def _artifact_location(uri: str) -> str | None:
    """Next to a local SQLite file, artifacts go to ./mlartifacts beside it (absolute);
    a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=_artifact_location(uri))


CONFIG_NAME = "mtml.config_name"


def unique_name(config_name: str) -> str:
    """A run's MLflow name: its config's name and a short random suffix, so that the runs of
    one config stay apart in the UI (the tag `mtml.config_name` keeps what they share)."""
    import secrets

    return f"{config_name}-{secrets.token_hex(3)}"


def newest_run_of(uri: str, experiment: str, config_name: str, status: str):
    """The newest run of a config in `experiment` whose status matches `status` (a filter
    clause), found by its `mtml.config_name` tag, or by its name for runs older than the tag."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    for key in (CONFIG_NAME, "mlflow.runName"):  # MLflow's filter has no OR
        runs = [] if exp is None else c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{key}` = '{config_name}' and {status}",
            order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0]
    return None


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
               config_name: str | None = None) -> str:
    """A run named `run_name`; with `config_name` (a command's own run) named `unique_name` of
    it instead and tagged `mtml.config_name`, which `--resume` and `transfer.source` look up."""
    from mlflow.entities import Param

    with uninterrupted():  # a Ctrl-C mid-transaction would keep SQLite's write lock
        c = client(uri)
        if config_name is not None:
            run_name, tags = unique_name(config_name), {CONFIG_NAME: config_name, **tags}
        run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id


def find_resumable_run(uri: str, experiment: str, config_name: str) -> str | None:
    """The newest unfinished run of this config: what `--resume` continues."""
    run = newest_run_of(uri, experiment, config_name, "attributes.status != 'FINISHED'")
    return run.info.run_id if run else None


def set_status(uri: str, run_id: str, status: str) -> None:
    """FINISHED, FAILED or KILLED; RUNNING again when a run is resumed."""
    with uninterrupted():
        c = client(uri)
        if status == "RUNNING":
            c.update_run(run_id, status="RUNNING")
        else:
            c.set_terminated(run_id, status=status)


def end_children(uri: str, parent: str, status: str) -> None:
    """Marks the parent's child runs that are still RUNNING (trials cut off) with `status`."""
    with uninterrupted():
        c = client(uri)
        experiment = c.get_run(parent).info.experiment_id
        for run in c.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"):
            c.set_terminated(run.info.run_id, status=status)


@contextlib.contextmanager
def final_status(uri: str, run_id: str):
    """The run's status once the block ends: FINISHED when it completes, KILLED on Ctrl-C or
    SIGTERM (its child runs still RUNNING too), FAILED on anything else."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt as interrupt:
        status = "KILLED"
        end_children(uri, run_id, status)
        interrupt.run_id = run_id  # the outermost run, for the command's last line
        raise
    finally:
        set_status(uri, run_id, status)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    with uninterrupted():
        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        c = client(uri)
        for i in range(0, len(items), 500):
            c.log_batch(run_id, metrics=items[i : i + 500])


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
    merged["val/mean_loss"] = mean_val_loss(merged)
    return epoch, merged


def progress_line(epoch: int, epochs: int, metrics: dict[str, float], counter: str = "epoch") -> str:
    done = epoch + 1 if counter == "epoch" else epoch  # epochs count from 0, iterations done from 1
    parts = [f"{counter} {done}/{epochs}", f"val/mean_loss {metrics['val/mean_loss']:.4f}"]
    parts += [
        f"{k.split('/')[1]} {k.split('/')[2]} {v:.4f}"
        for k, v in sorted(metrics.items())
        if k.startswith("val/") and k.count("/") == 2 and k.split("/")[-1] in ("accuracy", "r2")
    ]
    unit = "samples" if counter == "epoch" else "tasks"
    parts.append(f"{metrics['throughput/samples_per_s']:.0f} {unit}/s")
    return "[mtml] " + " | ".join(parts)


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
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MetricSpool:
    """Reports the tracking server did not take, in order. Kept in memory while it answers;
    `save` mirrors them to a local JSON-lines file when it does not, so that nothing is lost if
    the run ends before it returns. Each keeps its original timestamp, so that sending it again
    is the same metric, not a second one."""

    def __init__(self, path: str):
        self.path, self.reports = path, []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.reports.append({"step": step, "timestamp_ms": int(time.time() * 1000), "metrics": metrics})

    def send(self, uri: str, run_id: str) -> None:
        """Logs what is kept, oldest first, dropping each once the server took it; raises on
        the first that fails. When all went, the local copy is no longer needed."""
        while self.reports:
            r = self.reports[0]
            log_metrics(uri, run_id, r["metrics"], r["step"], r["timestamp_ms"])
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
    counted in the tag `mtml.restarts` and the metric `system/restarts`.

    A tracking server that stops answering does not stop training: the report is kept in a
    `MetricSpool` and sent before the next one; the driver sends what is left at the end."""

    def __init__(self, uri: str, run_id: str, epochs: int, counter: str, max_failures: int, spool: str,
                 terminal: str | None = None):
        self.uri, self.run_id, self.epochs, self.counter, self.terminal = uri, run_id, epochs, counter, terminal
        self.max_failures, self.failures, self.next_step = max_failures, 0, 0
        self.spool = MetricSpool(spool)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        epoch, merged = merge_worker_metrics(metrics, self.counter)
        self._log(merged, epoch)
        self.next_step = epoch + 1
        say(progress_line(epoch, self.epochs, merged, self.counter), self.terminal)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.spool.add(step, metrics)
        try:
            with fail_fast():  # MLflow's own retries would hold every worker at the next report for minutes
                self.spool.send(self.uri, self.run_id)
        except Exception as e:  # noqa: BLE001 - whatever the client raises, training goes on
            self.spool.save()
            reason = str(e).splitlines()[0][:160]
            say(f"[mtml] warning: tracking server not answering ({reason}); {len(self.spool.reports)} "
                f"report(s) kept in {self.spool.path}, sent when it answers", self.terminal)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        what = worker_error_summary(worker_exceptions)
        c = client(self.uri)
        c.set_tag(self.run_id, "mtml.last_worker_error", what[:5000])
        if self.max_failures != -1 and self.failures > self.max_failures:
            return  # no restart left: the driver reports the failure
        c.set_tag(self.run_id, "mtml.restarts", str(self.failures))
        log_metrics(self.uri, self.run_id, {"system/restarts": self.failures}, step=self.next_step)
        say(f"[mtml] worker failure ({what}): restart {self.failures} from the last checkpoint", self.terminal)
