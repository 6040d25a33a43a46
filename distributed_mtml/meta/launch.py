"""The driver of `mtml meta-train`: plan, MLflow run, TorchTrainer, model artifact, status."""

from __future__ import annotations

import os
import tempfile

from distributed_mtml import report
from distributed_mtml.config import Config
from distributed_mtml.meta.plan import MetaPlan, make_meta_plan
from distributed_mtml.runtime.driver import RunSpec, TrainOutcome, launch, log_run_files
from distributed_mtml.tracking import Tracker


def _log_artifacts(plan: MetaPlan, tracker: Tracker, run_id: str, checkpoint_dir: str) -> None:
    c = tracker.client()
    log_run_files(c, run_id, plan.config, checkpoint_dir, plan.suite_dir)
    histories = {
        "meta": {
            split: [(m.step, m.value) for m in c.get_metric_history(run_id, f"{split}/meta/loss")]
            for split in ("train", "val")
        }
    }
    with tempfile.TemporaryDirectory() as d:
        plots = report.learning_curves(histories, os.path.join(d, "plots"), x_label="meta-iteration",
                                       y_label="query loss after adaptation")
        c.log_artifacts(run_id, os.path.dirname(plots[0]), "plots")


def run_meta_training(
    config: Config, run_name: str, tracker: Tracker, resume: bool = False, address: str | None = None
) -> TrainOutcome:
    from distributed_mtml.meta.worker import meta_train_loop_per_worker

    plan = make_meta_plan(config)  # bad input stops here, before Ray starts
    spec = RunSpec(
        tags={"mtml.command": "meta-train", "mtml.suite": plan.name, "mtml.algorithm": config.meta.algorithm},
        plan_params={"source": plan.source, "shards": plan.shards(config.scaling.max_workers)},
        loop=meta_train_loop_per_worker,
        payload=plan.model_dump(mode="json"),
        total=config.meta.iterations,
        counter="iteration",
        log_artifacts=lambda tracker, run_id, d: _log_artifacts(plan, tracker, run_id, d),
    )
    return launch(config, run_name, spec, tracker, resume, address)
