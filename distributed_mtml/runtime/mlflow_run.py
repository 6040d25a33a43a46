"""The MLflow run of a training command: created or found again for `--resume`, its files and
datasets logged, the metrics the tracking server missed sent once training is done, the kept
model's step recorded, and the writes after training retried, the model's first (`retried`,
`optional_writes`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Callable, TypeVar

import yaml

from distributed_mtml.config import Config, run_params
from distributed_mtml.data.suite import join_path, read_text, suite_yaml_path
from distributed_mtml.data.tasks import load_suite_spec
from distributed_mtml.errors import InputError, TrainingFailed
from distributed_mtml.runtime.callback import MetricSpool, fail_fast
from distributed_mtml.runtime.checkpoint import check_resumable, load_state
from distributed_mtml.runtime.monitor import SCORE
from distributed_mtml.tracking import Tracker

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")


def start_or_resume_run(
    cfg: Config, tracker: Tracker, run_name: str, resume: bool, tags: dict[str, str], plan_params: dict
) -> tuple[str, str]:
    """(MLflow run id, Ray Train run name). The Ray name is derived from the MLflow run, so a
    resumed run finds both its metrics and its checkpoints again."""
    if resume:
        run_id = tracker.find_resumable_run(cfg.tracking.experiment, run_name)
        if run_id is None:
            raise InputError(f"--resume: no unfinished run of config '{run_name}' in experiment '{cfg.tracking.experiment}'")
        last = check_resumable(cfg.checkpoint.resolved_dir(), f"{run_name}-{run_id[:12]}", cfg.model.model_dump(mode="json"))
        name = tracker.client().get_run(run_id).info.run_name
        print(f"[mtml] resuming run {run_id} ('{name}') {_resume_point(last)}", flush=True)
        tracker.set_status(run_id, "RUNNING")
    else:
        params = {**run_params(cfg, tags["mtml.command"]), **{f"plan.{k}": v for k, v in plan_params.items()}}
        run_id = tracker.create_run(cfg.tracking.experiment, run_name, tags, params, config_name=run_name)
    return run_id, f"{run_name}-{run_id[:12]}"

def _resume_point(last: str | None) -> str:
    """Where a resumed run continues from its newest checkpoint `last`: 'after epoch N
    (checkpoint ...)', or from the start."""
    if last is None:
        return "from the start: it wrote no checkpoint"
    if "://" in last:
        return f"from {last}"
    state = load_state(last)
    done = state.get("iterations_done")
    where = f"after iteration {done}" if done is not None else f"after epoch {int(state['epoch']) + 1}"
    return f"{where} (checkpoint {last})"

def log_run_files(tracker: Tracker, run_id: str, cfg: Config, suite_dir: str | None) -> None:
    """The config, the suite description, and each task of the suite as a dataset input."""
    c = tracker.client()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        c.log_artifact(run_id, os.path.join(d, "config.yaml"))
        if suite_dir is not None:
            with open(os.path.join(d, "suite.yaml"), "w") as f:
                f.write(read_text(suite_yaml_path(suite_dir)))
            c.log_artifact(run_id, os.path.join(d, "suite.yaml"))
    if suite_dir is not None:
        tracker.log_datasets(run_id, suite_datasets(suite_dir))

def suite_datasets(suite_dir: str) -> list[tuple[str, str, str, pa.Schema]]:
    """(name, source URI, digest, schema) of each task's files: what trained the run. A grouped
    entry's table is one dataset, named for the entry (not one per group: a thousand)."""
    from distributed_mtml.data.scan import fingerprint, open_task

    entries = {task.entry: task for task in load_suite_spec(suite_dir).tasks}
    return [(name, join_path(suite_dir, task.path), fingerprint(suite_dir, task), open_task(suite_dir, task).schema)
            for name, task in entries.items()]

def send_kept_metrics(tracker: Tracker, run_id: str, spool: str, checkpoint: str, wait_s: float = 120) -> None:
    """What the tracking server missed during training, sent now, trying every 2 s for up to
    `wait_s`. If it still does not answer, the run cannot be closed: say where the model and
    the unsent metrics are."""
    import time

    kept = MetricSpool.load(spool)
    deadline = time.monotonic() + wait_s
    with fail_fast():
        while True:
            try:
                return kept.send(tracker, run_id)
            except Exception as e:  # noqa: BLE001 - any client error means the same to the user
                if time.monotonic() > deadline:
                    raise TrainingFailed(
                        f"training finished but the tracking server {tracker} does not answer "
                        f"({str(e).splitlines()[0][:160]}): the model is in {checkpoint}, "
                        f"{len(kept.reports)} unsent report(s) in {spool}") from None
                time.sleep(2)

def log_kept(tracker: Tracker, run_id: str, config: Config, counter: str, latest: dict, kept: dict) -> int:
    """Says which model the run kept: tag mtml.best_<counter>, metric best/<monitor>, and
    mtml.stopped_early. Returns the kept step."""
    step = int(kept.get("best_step", kept.get(counter, -1)))
    c = tracker.client()
    c.set_tag(run_id, f"mtml.best_{counter}", str(step))
    c.set_tag(run_id, "mtml.stopped_early", "true" if latest.get("stopped_early") else "false")
    if SCORE in kept:
        tracker.log_metrics(run_id, {f"best/{config.checkpoint.monitor}": kept[SCORE]}, step)
    return step

WRITE_TRIES, RETRY_PAUSE_S = 3, 2.0  # a write after training: tries, and the pause between them
UNLOGGED = "mtml.unlogged"  # the tag listing what a finished run could not log


def retried(what: str, write: Callable[[], T], tries: int = WRITE_TRIES) -> T:
    """`write` tried up to `tries` times, RETRY_PAUSE_S apart: a store busy with other runs, or two runs
    inserting the same dataset at one moment (a unique-key violation), answer on the next try,
    where the row is then found. The last failure is raised."""
    import time

    for attempt in range(1, tries + 1):
        try:
            return write()
        except Exception as e:  # noqa: BLE001 - any store error may be transient here
            if attempt == tries:
                raise
            print(f"[mtml] logging {what} failed ({_first_line(e)}); trying again", flush=True)
            time.sleep(RETRY_PAUSE_S)
    raise AssertionError("unreachable")


def optional_writes(tracker: Tracker, run_id: str, writes: dict[str, Callable[[], object]]) -> None:
    """The writes after training that the logged model does not need (files, datasets, metrics,
    figures), each `retried`; one that still fails is a warning line and a name in the run's tag
    `mtml.unlogged`, not a failed run: the training is finished and its model already logged."""
    failed = []
    for what, write in writes.items():
        try:
            retried(what, write)
        except Exception as e:  # noqa: BLE001
            failed.append(what)
            print(f"[mtml] warning: could not log {what} ({_first_line(e)}); the model is logged, the run finishes",
                  flush=True)
    if failed:
        with contextlib.suppress(Exception):
            tracker.client().set_tag(run_id, UNLOGGED, ",".join(failed))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
