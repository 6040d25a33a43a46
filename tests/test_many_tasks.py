"""Many tasks: per-task metrics folded into summaries across tasks for MLflow, every value kept in
Parquet tables (`per_task`)."""

import numpy as np
import pandas as pd
import pytest

from distributed_mtml import per_task


def test_keys_split_into_prefix_task_and_metric_even_with_a_slash_in_the_task():
    assert per_task.split_key("val/store/17/r2") == ("val", "store/17", "r2")
    assert per_task.split_key("baseline/test/a/loss") == ("baseline/test", "a", "loss")
    assert per_task.split_key("aggregation/a/weight") == ("aggregation", "a", "weight")
    assert per_task.split_key("val/mean_loss") is None and per_task.split_key("throughput/samples_per_s") is None


def test_summaries_equal_numpys_over_the_tasks_and_the_rows_hold_every_value():
    rng = np.random.default_rng(0)
    loss, r2 = rng.random(40), rng.random(40) - 0.5
    metrics = {**{f"val/t{i}/loss": float(v) for i, v in enumerate(loss)},
               **{f"val/t{i}/r2": float(v) for i, v in enumerate(r2)}, "val/mean_loss": 0.5}
    summary, rows = per_task.summarize(metrics)
    assert summary["val/mean_loss"] == 0.5 and not any(per_task.split_key(k) for k in summary)
    assert summary["tasks/val/loss/mean"] == pytest.approx(loss.mean())
    assert summary["tasks/val/loss/median"] == pytest.approx(np.median(loss))
    assert summary["tasks/val/loss/p10"] == pytest.approx(np.percentile(loss, 10))
    assert summary["tasks/val/loss/p90"] == pytest.approx(np.percentile(loss, 90))
    assert summary["tasks/val/loss/worst"] == pytest.approx(loss.max())  # a loss: the highest
    assert summary["tasks/val/r2/worst"] == pytest.approx(r2.min())  # R^2: the lowest
    assert len(rows) == 40 and rows["t7"] == {"val/loss": loss[7], "val/r2": r2[7]}
    worst, best = per_task.ranked(rows, "val/loss", "loss", 3)
    assert [t for t, _ in worst] == [f"t{i}" for i in np.argsort(-loss)[:3]]
    assert [t for t, _ in best] == [f"t{i}" for i in np.argsort(loss)[:3]]


def test_a_task_makes_the_keys_its_metrics_name():
    """`per_task.keys_of` counts from `metrics.METRICS`, which must be what a task's metrics hold."""
    import torch

    from distributed_mtml.metrics import METRICS, task_metrics
    from distributed_mtml.models import TaskShape

    regression = task_metrics(TaskShape("r", "regression", 2), torch.randn(9, 1), torch.randn(9))
    classes = task_metrics(TaskShape("c", "classification", 2, 3), torch.randn(9, 3), torch.arange(9) % 3)
    assert set(regression) == {"loss", *METRICS["regression"]} and set(classes) == {"loss", *METRICS["classification"]}
    assert per_task.keys_of("regression", False) == 17 and per_task.keys_of("classification", True) == 14


def test_the_default_folds_when_per_task_keys_would_pass_the_budget_and_a_set_limit_wins(tmp_path):
    from distributed_mtml.config import validate_config
    from distributed_mtml.data.generators import make_suite
    from distributed_mtml.train.plan import make_plan

    folds = {}
    for groups in (4, 5):
        suite = str(tmp_path / f"suite{groups}")
        make_suite("multilevel", suite, {"groups": groups, "rows": 20, "seed": 0})
        for limit in (None, 4):
            config = validate_config({"suite": {"path": suite}, "tracking": {"task_metrics_limit": limit}})
            folds[groups, limit] = make_plan(config).folds_task_metrics()
    assert folds == {(4, None): False, (5, None): True, (4, 4): False, (5, 4): True}  # 68 keys, 85 keys
    config = validate_config({"suite": {"path": str(tmp_path / "suite5")}, "tracking": {"task_metrics_limit": 10}})
    assert not make_plan(config).folds_task_metrics()


def test_a_run_past_the_key_budget_logs_summaries_and_tables_not_a_key_per_task(tmp_path, capsys):
    """Local mode, 8 groups and the default limit (8 x 17 keys would pass the budget): MLflow holds
    no per-task key, every epoch's values and the test and baseline values are in
    `per_task/*.parquet`, one figure shows the spread; the console still shows every task."""
    from mlflow.tracking import MlflowClient

    from distributed_mtml.cli import main
    from distributed_mtml.data.generators import make_suite

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 8, "rows": 30, "seed": 0})
    config = tmp_path / "many.yaml"
    config.write_text(f"suite: {{path: {suite}}}\ntraining: {{epochs: 3, report_every_s: 0}}\n"
                      "scaling: {num_workers: 0}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "--config", str(config), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "\ng0007 " in out and "worst by loss:" not in out and "beats trivial" not in out  # a row per task
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    page = f"its page:    http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert page in out
    keys = set(run.data.metrics)
    assert not [k for k in keys if per_task.split_key(k)], "a per-task key reached MLflow"
    assert {"tasks/val/loss/mean", "tasks/val/r2/worst", "tasks/test/mse/median", "tasks/baseline/test/loss/mean"} <= keys
    assert len(keys) <= 100
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "per_task")}
    assert {"per_task/epoch_000000.parquet", "per_task/epoch_000002.parquet", "per_task/test.parquet",
            "per_task/baseline.parquet"} <= tables
    test = pd.read_parquet(client.download_artifacts(run.info.run_id, "per_task/test.parquet", str(tmp_path)))
    assert len(test) == 8 and test["test/mse"].mean() == pytest.approx(run.data.metrics["tasks/test/mse/mean"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/all 8 tasks.png"]
    from distributed_mtml.train.launch import _loss_histories

    last = pd.read_parquet(client.download_artifacts(run.info.run_id, "per_task/epoch_000002.parquet", str(tmp_path)))
    worst = last.nlargest(3, "val/loss")
    curves = _loss_histories(client, run.info.run_id, list(test.task), many=True)["all 8 tasks"]
    assert {f"val {t}" for t in worst.task} <= set(curves) and "val mean" in curves
    for task, loss in zip(worst.task, worst["val/loss"]):
        assert [s for s, _ in curves[f"val {task}"]] == [0, 1, 2] and curves[f"val {task}"][-1][1] == pytest.approx(loss)


def test_evaluate_with_many_tasks_prints_the_spread_and_writes_every_task(tmp_path, capsys):
    """`mtml evaluate` of a model of more tasks than its run's limit: the summary table, the worst
    and best tasks, and every task's metrics in the Parquet file `--table` names."""
    from distributed_mtml.cli import main
    from distributed_mtml.data.generators import make_suite

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 6, "rows": 30, "seed": 1})
    config = tmp_path / "few.yaml"
    config.write_text(f"suite: {{path: {suite}}}\ntraining: {{epochs: 2}}\nscaling: {{num_workers: 0}}\n"
                      "tracking: {task_metrics_limit: 3}\ncheckpoint: {dir: " + str(tmp_path / "runs") + "}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "--config", str(config), "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("\nrun ")[1].split()[0]
    table = tmp_path / "scores.parquet"
    assert main(["evaluate", "--run", run_id, "--tracking-uri", uri, "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "6 tasks" in out and "worst by loss:" in out and str(table) in out
    scores = pd.read_parquet(table)
    assert len(scores) == 6 and {"task", "test/mse", "test/r2", "test/loss"} <= set(scores.columns)
