"""The driver of `mtml train`: plan, MLflow run, TorchTrainer, artifacts, final status."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import yaml

from distributed_mtml import report, tracking
from distributed_mtml.config import Config, flatten
from distributed_mtml.data.suite import read_text, suite_yaml_path
from distributed_mtml.errors import InputError
from distributed_mtml.train.plan import TrainPlan, make_plan


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str


def _start_or_resume_run(plan: TrainPlan, uri: str, run_name: str, resume: bool) -> tuple[str, str]:
    """(MLflow run id, Ray Train run name). The Ray name is derived from the MLflow run, so a
    resumed run finds both its metrics and its checkpoints again."""
    cfg = plan.config
    if resume:
        run_id = tracking.find_resumable_run(uri, cfg.tracking.experiment, run_name)
        if run_id is None:
            raise InputError(f"--resume: no unfinished run named '{run_name}' in experiment '{cfg.tracking.experiment}'")
        tracking.set_status(uri, run_id, "RUNNING")
    else:
        tags = {"mtml.command": "train", "mtml.suite": plan.suite_name, "mtml.aggregation": cfg.aggregation.method}
        params = flatten(cfg.model_dump(mode="json"))
        params.update({"plan.steps_per_epoch": plan.steps_per_epoch, "plan.placement": plan.placement})
        run_id = tracking.create_run(uri, cfg.tracking.experiment, run_name, tags, params)
    return run_id, f"{run_name}-{run_id[:12]}"


def _trainer(plan: TrainPlan, uri: str, run_id: str, ray_name: str):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed_mtml.train.worker import train_loop_per_worker

    cfg = plan.config
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.model_dump(mode="json"),
        torch_config=TorchConfig(timeout_s=600),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=cfg.checkpoint.resolved_dir(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=[tracking.MLflowMetricsCallback(uri, run_id, cfg.training.epochs)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _log_artifacts(plan: TrainPlan, uri: str, run_id: str, checkpoint_dir: str) -> None:
    c = tracking.client(uri)
    c.log_artifacts(run_id, checkpoint_dir, "model")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(plan.config.model_dump(mode="json"), f, sort_keys=False)
        with open(os.path.join(d, "suite.yaml"), "w") as f:
            f.write(read_text(suite_yaml_path(plan.suite_dir)))
        c.log_artifact(run_id, os.path.join(d, "config.yaml"))
        c.log_artifact(run_id, os.path.join(d, "suite.yaml"))
        histories = {
            task: {
                split: [(m.step, m.value) for m in c.get_metric_history(run_id, f"{split}/{task}/loss")]
                for split in ("train", "val")
            }
            for task in plan.train_rows
        }
        plots = report.learning_curves(histories, os.path.join(d, "plots"))
        c.log_artifacts(run_id, os.path.dirname(plots[0]), "plots")
        if plan.config.relations.enabled:
            _log_relations(c, run_id, list(plan.train_rows), os.path.join(d, "relations"))


def _log_relations(c, run_id: str, order: list[str], out_dir: str) -> None:
    """Affinity and cosine averaged over all epochs (TAG averages over training), as CSV and heatmaps."""
    from distributed_mtml import relations

    os.makedirs(out_dir)
    for kind, title in [("affinity", "TAG affinity (source -> recipient)"), ("cosine", "gradient cosine")]:
        means = {}
        for a in order:
            for b in order:
                key = f"relations/{kind}/{a}/{b}"
                history = c.get_metric_history(run_id, key)
                if history:
                    means[key] = sum(m.value for m in history) / len(history)
        values = relations.matrix(means, kind, order)
        with open(os.path.join(out_dir, f"{kind}.csv"), "w") as f:
            f.write(relations.to_csv(values, order))
        relations.heatmap(values, order, title, os.path.join(out_dir, f"{kind}.png"))
    c.log_artifacts(run_id, out_dir, "relations")


def ensure_ray(address: str | None) -> None:
    """Joins the cluster at `address`, or starts a local Ray inside this process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)


def run_training(
    config: Config, run_name: str, tracking_uri: str | None = None, resume: bool = False, address: str | None = None
) -> TrainOutcome:
    plan = make_plan(config)  # bad input stops here, before Ray starts
    uri = tracking.resolve_tracking_uri(tracking_uri, config.tracking.uri)
    run_id, ray_name = _start_or_resume_run(plan, uri, run_name, resume)
    status = "FAILED"
    try:
        ensure_ray(address)
        result = _trainer(plan, uri, run_id, ray_name).fit()
        with result.checkpoint.as_directory() as d:
            _log_artifacts(plan, uri, run_id, d)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.set_status(uri, run_id, status)
    metrics = tracking.client(uri).get_run(run_id).data.metrics
    return TrainOutcome(run_id, uri, metrics, result.checkpoint.path)
