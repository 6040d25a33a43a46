"""The driver every training command shares: check what the run needs, create or resume its
MLflow run, fit the trainer (or train in this process), log the kept model's artifacts, and set
the run's final status (FINISHED, KILLED on Ctrl-C, FAILED otherwise). Each step's machinery has
its own module: `cluster` (Ray and its resources), `mlflow_run`, `trainer`.

A recipe (`train/launch.py`, `meta/launch.py`) plans its run, describes it as a `RunSpec` and
calls `launch`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from distributed_mtml import compat, console
from distributed_mtml.config import Config
from distributed_mtml.errors import InputError
from distributed_mtml.runtime.callback import MLflowMetricsCallback, spool_path
from distributed_mtml.runtime.checkpoint import check_writable
from distributed_mtml.runtime.cluster import check_local_resources, ensure_ray, wait_for_resources
from distributed_mtml.runtime.mlflow_run import log_kept, send_kept_metrics, start_or_resume_run
from distributed_mtml.runtime.trainer import best_checkpoint, fit, fit_local, make_trainer
from distributed_mtml.tracking import Tracker


@dataclass
class TrainOutcome:
    run_id: str
    tracker: Tracker
    metrics: dict[str, float]  # the run's MLflow metrics (latest value of each)
    checkpoint_path: str  # the kept model: the best checkpoint by checkpoint.monitor
    kept: dict[str, float]  # what the workers reported at the kept model's step
    best_step: int  # its epoch (meta: iterations done)
    stopped_early: bool

@dataclass
class RunSpec:
    """What differs between `mtml train` and `mtml meta-train` runs; `launch` does the rest."""

    tags: dict[str, str]
    plan_params: dict
    loop: Callable[[dict], None]  # the Ray Train loop per worker
    payload: dict  # its plan, as JSON
    total: int  # epochs or meta-iterations, for the progress line
    counter: str  # "epoch" or "iteration": the MLflow step of every metric
    log_artifacts: Callable[[Tracker, str, str, int], None]  # (tracker, run id, kept checkpoint dir, its step)
    datasets: dict[str, Callable] = field(default_factory=dict)  # name -> a function making a Ray dataset
    fold_task_metrics: bool = False  # per-task metrics as summaries and tables (`per_task`)
    # a run inside a search (`search/`): (run id, rank 0's metrics of an epoch) in local mode, where the
    # callback runs in this process; and (run id) -> more Ray Train callbacks for the workers' reports
    on_epoch: Callable[[str, dict], None] | None = None
    train_callbacks: Callable[[str], list] | None = None

def launch(config: Config, run_name: str, spec: RunSpec, tracker: Tracker, resume: bool,
           address: str | None) -> TrainOutcome:
    """Creates (or resumes) the MLflow run, fits the TorchTrainer, logs the artifacts from its
    last checkpoint and sets the run's final status: FINISHED, KILLED on Ctrl-C, FAILED on
    anything else."""
    if config.scaling.local and "://" in config.checkpoint.resolved_dir():
        raise InputError(f"checkpoint.dir: {config.checkpoint.resolved_dir()} is not on this machine; scaling.num_workers: 0 "
                         "keeps its checkpoints here (a local path)")
    check_local_resources(config, address, bool(spec.datasets))
    check_writable(config.checkpoint.resolved_dir())
    run_id, ray_name = start_or_resume_run(config, tracker, run_name, resume, spec.tags, spec.plan_params)
    spool = spool_path(config.checkpoint.resolved_dir(), ray_name)
    terminal = None if config.scaling.local else f"mtml-console-{ray_name}"  # local: this process prints
    on_epoch = functools.partial(spec.on_epoch, run_id) if spec.on_epoch and config.scaling.local else None
    callback = MLflowMetricsCallback(tracker, run_id, spec.total, spec.counter, config.checkpoint.max_failures,
                                     spool, terminal, spec.fold_task_metrics, on_epoch)
    more = spec.train_callbacks(run_id) if spec.train_callbacks else []
    with tracker.final_status(run_id):
        if config.scaling.local:
            result = fit_local(spec.loop, spec.payload, spec.datasets, config, ray_name, callback, address)
        else:
            ensure_ray(address)
            wait_for_resources(config, bool(spec.datasets))
            with console.relay(terminal):
                result = fit(make_trainer(spec.loop, spec.payload, config, ray_name, callback, terminal, spec.datasets,
                                          more), config, ray_name, bool(spec.datasets))
        send_kept_metrics(tracker, run_id, spool, result.checkpoint.path)
        kept, kept_metrics = best_checkpoint(result, config.checkpoint.mode)
        best_step = log_kept(tracker, run_id, config, spec.counter, result.metrics, kept_metrics)
        compat.hold_mmap_threshold()  # no training follows here: the test split's reading and scoring stay bounded
        with kept.as_directory() as d:
            spec.log_artifacts(tracker, run_id, d, best_step)
    metrics = tracker.client().get_run(run_id).data.metrics
    return TrainOutcome(run_id, tracker, metrics, kept.path, kept_metrics, best_step, bool(result.metrics.get("stopped_early")))
