"""The driver of `mtml meta-train`: plan, MLflow run, TorchTrainer, model artifact, status."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd

from distributed_mtml import report
from distributed_mtml.config import Config
from distributed_mtml.meta.plan import MetaPlan, make_meta_plan
from distributed_mtml.model_log import input_example, log_mlflow_model
from distributed_mtml.runtime.driver import RunSpec, TrainOutcome, launch
from distributed_mtml.runtime.mlflow_run import log_run_files, optional_writes, retried
from distributed_mtml.tracking import Tracker


def _log_artifacts(plan: MetaPlan, tracker: Tracker, run_id: str, checkpoint_dir: str, best_iteration: int,
                   register: str | None) -> None:
    """The kept model first, then the run's files and figure (see `optional_writes`)."""
    c = tracker.client()
    retried("the model", lambda: log_mlflow_model(tracker, run_id, checkpoint_dir, _example(plan), best_iteration,
                                                  register))

    def figure() -> None:
        histories = {"meta": {split: [(m.step, m.value) for m in c.get_metric_history(run_id, f"{split}/meta/loss")]
                              for split in ("train", "val")}}
        with tempfile.TemporaryDirectory() as d:
            plots = report.learning_curves(histories, os.path.join(d, "plots"), x_label="meta-iteration",
                                           y_label="query loss after adaptation")
            c.log_artifacts(run_id, os.path.dirname(plots[0]), "plots")

    optional_writes(tracker, run_id, {
        "the config, suite and datasets": lambda: log_run_files(tracker, run_id, plan.config, plan.suite_dir),
        "the figures": figure,
    })


def _example(plan: MetaPlan) -> pd.DataFrame:
    """The model's input example: rows of the suite's first task, or points of the family."""
    if plan.suite_dir is None:
        return pd.DataFrame({c: np.linspace(-5.0, 5.0, 5) for c in plan.features})
    return input_example(plan.suite_dir, {plan.suite_tasks[0]: plan.features})


def run_meta_training(
    config: Config, run_name: str, tracker: Tracker, resume: bool = False, address: str | None = None,
    register: str | None = None,
) -> TrainOutcome:
    """Meta-trains; the kept model becomes the run's MLflow model (and, with `register`, a version
    of that registered model)."""
    from distributed_mtml.meta.worker import meta_train_loop_per_worker

    plan = make_meta_plan(config)  # bad input stops here, before Ray starts
    spec = RunSpec(
        tags={"mtml.command": "meta-train", "mtml.suite": plan.name, "mtml.algorithm": config.meta.algorithm},
        plan_params={"source": plan.source, "shards": plan.shards(config.scaling.max_workers),
                     "held_tasks": plan.held_tasks},
        loop=meta_train_loop_per_worker,
        payload=plan.model_dump(mode="json"),
        total=config.meta.iterations,
        counter="iteration",
        log_artifacts=lambda tracker, run_id, d, step: _log_artifacts(plan, tracker, run_id, d, step, register),
    )
    return launch(plan.config, run_name, spec, tracker, resume, address)  # its model as resolved by the plan
