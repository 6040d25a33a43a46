"""`mtml train`: plan the multi-task run, launch it on the shared driver, log what it made."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import TYPE_CHECKING, Callable

from distributed_mtml import gates, per_task, report
from distributed_mtml.artifacts import load_model
from distributed_mtml.config import Config
from distributed_mtml.model_log import input_example, log_mlflow_model
from distributed_mtml.runtime.driver import RunSpec, TrainOutcome, launch
from distributed_mtml.runtime.mlflow_run import log_run_files, optional_writes, retried
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.plan import TrainPlan, make_plan

if TYPE_CHECKING:
    from distributed_mtml.search.trial import TrialRole


def _log_artifacts(plan: TrainPlan, tracker: Tracker, run_id: str, checkpoint_dir: str, best_epoch: int,
                   register: str | None) -> None:
    """The kept model first (a finished training must not be lost to a later write), then the
    run's files, datasets, test and baseline metrics and figures, each retried and, if it still
    fails, named in a warning (`optional_writes`)."""
    from distributed_mtml.baseline import baseline_metrics
    from distributed_mtml.evaluate import evaluate

    c = tracker.client()
    many = plan.folds_task_metrics()  # tables and summaries: see per_task
    example = input_example(plan.suite_dir, plan.features)
    model = retried("the model", lambda: log_mlflow_model(tracker, run_id, checkpoint_dir, example, best_epoch, register))
    # the kept model scored once on the test split: the numbers to report (selection used val only)
    kept = load_model(checkpoint_dir)[0]
    test = evaluate(kept, plan.suite_dir, "test", checked=True)

    def baseline() -> None:
        trivial = baseline_metrics(plan.suite_dir, preprocessing=plan.preprocessing,
                                   shapes={s.name: s for s in plan.task_shapes()})
        tracker.log_metrics(run_id, _folded(c, run_id, {f"baseline/{k}": v for k, v in trivial.items()}, "baseline",
                                            many), step=0)

    def figures() -> None:
        with tempfile.TemporaryDirectory() as d:
            plots = report.learning_curves(_loss_histories(c, run_id, list(plan.train_rows), many),
                                           os.path.join(d, "plots"))
            c.log_artifacts(run_id, os.path.dirname(plots[0]), "plots")
            if plan.config.relations.enabled:
                _log_relations(c, run_id, list(plan.train_rows), os.path.join(d, "relations"))
            _log_learned(c, run_id, kept, plan.suite_dir, [s.name for s in plan.task_shapes()], os.path.join(d, "gates"))

    optional_writes(tracker, run_id, {
        "the test metrics": lambda: tracker.log_metrics(run_id, _folded(c, run_id, test, "test", many), step=0,
                                                        model_id=model.model_id),
        "the config, suite and datasets": lambda: log_run_files(tracker, run_id, plan.config, plan.suite_dir),
        "the baseline metrics": baseline,
        "the figures": figures,
    })


def _folded(c, run_id: str, metrics: dict[str, float], name: str, many: bool) -> dict[str, float]:
    """With many tasks, the summaries of `metrics`, their values in the table `per_task/<name>`."""
    if not many:
        return metrics
    summary, rows = per_task.summarize(metrics)
    per_task.log_table(c, run_id, rows, name)
    return summary


def _loss_histories(c, run_id: str, tasks: list[str], many: bool) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What the learning-curve figures show: each task's train and val loss, or with many tasks
    one figure of their summaries across tasks (mean, median, the 90th percentile and the worst)
    and the val loss of the few tasks worst at the end."""
    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in c.get_metric_history(run_id, key)]

    if many:
        curves = {f"{split} {stat}": history(per_task.summary_key(split, "loss", stat))
                  for split in ("train", "val") for stat in ("mean", "median", "p90", "worst")}
        return {f"all {len(tasks)} tasks": {**curves, **_worst_tasks(c, run_id)}}
    return {task: {split: history(f"{split}/{task}/loss") for split in ("train", "val")} for task in tasks}


WORST_SHOWN = 3  # tasks whose own val loss the many-task figure draws


def _worst_tasks(c, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The val loss per epoch of the tasks worst at the last epoch, from the run's per-epoch
    tables (`per_task/epoch_*.parquet`)."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        local = c.download_artifacts(run_id, per_task.TABLE_DIR, d)
        names = sorted(n for n in os.listdir(local) if n.startswith("epoch_"))
        tables = [(int(n[len("epoch_"):-len(".parquet")]), pd.read_parquet(os.path.join(local, n)).set_index("task"))
                  for n in names]
    if not tables or "val/loss" not in tables[-1][1]:
        return {}
    worst = tables[-1][1]["val/loss"].nlargest(WORST_SHOWN).index
    return {f"val {task}": [(step, float(t.at[task, "val/loss"])) for step, t in tables if task in t.index]
            for task in worst}


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


def _log_learned(c, run_id: str, model, suite_dir: str, order: list[str], out_dir: str) -> None:
    """What the architecture learned of how tasks relate (`gates.py`), under `relations/`: a
    gated model's weights on its val rows (`gates.csv`, `gate_similarity.csv`, `gates.png`) and
    the similarity at every epoch from the weights logged each epoch, or cross-stitch's last
    mixing matrix (`cross_stitch.csv`, `.png`; its rows each epoch are metrics); nothing under `hard`."""
    matrix = gates.stitch(model)
    if matrix is not None:
        gates.write_stitch(matrix, order, out_dir)
    elif gates.gated(model):
        weights, names, columns = gates.mean_weights(model, suite_dir, "val")
        gates.write(weights, names, columns, out_dir)
        if len(names) <= gates.SIMILAR_UP_TO:  # each epoch's, from the logged weights (none when tables hold them)
            keys = [f"gates/{n}/{gates.key_name(col)}" for n in names for col in columns]
            history = {k: {m.step: m.value for m in c.get_metric_history(run_id, k)} for k in keys}
            if all(history.values()):
                with open(os.path.join(out_dir, "gate_similarity_by_epoch.csv"), "w") as f:
                    f.writelines(gates.similarity_by_epoch(history, names, columns))
    else:
        return
    c.log_artifacts(run_id, out_dir, "relations")


def _streamed_datasets(plan: TrainPlan) -> dict[str, Callable]:
    """`train-<task>` and `val-<task>` for each streamed task: a function building its Ray dataset
    (Ray Train calls it in the controller, again after a restart)."""
    from distributed_mtml.data.stream import dataset_name, split_dataset, task_features
    from distributed_mtml.data.tasks import load_suite_spec

    out = {}
    for task in load_suite_spec(plan.suite_dir).tasks:
        if task.name in plan.streamed:
            features = task_features(plan.suite_dir, task)
            for split in ("train", "val"):
                read = functools.partial(split_dataset, plan.suite_dir, task, features, split)
                out[dataset_name(task.name, split)] = read
    return out


def run_training(
    config: Config, run_name: str, tracker: Tracker, resume: bool = False, address: str | None = None,
    register: str | None = None, trial: TrialRole | None = None,
) -> TrainOutcome:
    """Trains the suite; the kept model becomes the run's MLflow model (and, with `register`, a
    version of that registered model). `trial`: the run is a trial of a search (`search/`): a
    child run reporting its epochs to Tune, and in the search stage logging nothing after
    training (no model, nothing of the test split)."""
    from distributed_mtml.train.worker import train_loop_per_worker

    plan = make_plan(config)  # bad input stops here, before Ray starts
    log_artifacts = lambda tracker, run_id, d, step: _log_artifacts(plan, tracker, run_id, d, step, register)  # noqa: E731
    if trial is not None and not trial.whole:
        log_artifacts = lambda *_: None  # noqa: E731
    spec = RunSpec(
        tags={"mtml.command": "train", "mtml.suite": plan.suite_name, "mtml.aggregation": config.aggregation.method,
              **({"mtml.streamed": ",".join(plan.streamed)} if plan.streamed else {}),
              **(trial.tags() if trial else {})},
        plan_params={"steps_per_epoch": plan.steps_per_epoch, "placement": plan.placement(config.scaling.max_workers)},
        loop=train_loop_per_worker,
        payload=plan.model_dump(mode="json"),
        total=config.training.epochs,
        counter="epoch",
        log_artifacts=log_artifacts,
        datasets=_streamed_datasets(plan),
        fold_task_metrics=plan.folds_task_metrics(),
        on_epoch=trial.on_epoch if trial else None,
        train_callbacks=trial.train_callbacks if trial else None,
    )
    return launch(config, run_name, spec, tracker, resume, address)
