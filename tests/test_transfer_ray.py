"""Integration: `mtml transfer` and `mtml tune` from a real source run, read back from MLflow,
including against a real `mlflow server` on loopback."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distributed_mtml.cli import main
from distributed_mtml.config import validate_config
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.launch import run_training

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def source(tmp_path_factory, ray_session):
    """A multi-task run on seed-example: the source model every test transfers from."""
    from distributed_mtml.data.generators import make_suite

    d = tmp_path_factory.mktemp("source")
    suite = str(d / "suite")
    make_suite("seed-example", suite, {"rows": 1000, "seed": 1})
    uri = f"sqlite:///{d}/mlflow.db"
    cfg = validate_config({"suite": {"path": suite}, "training": {"epochs": 8, "lr": 0.01},
                           "checkpoint": {"dir": str(d / "runs")}})
    out = run_training(cfg, "demo", Tracker(uri))  # the name the shipped transfer_tune.yaml looks up
    return {"uri": uri, "run_id": out.run_id, "checkpoint": out.checkpoint_path, "dir": d}


def _write(tmp_path, source_ref, **transfer):
    raw = {"transfer": {"source": source_ref, "target": {"generator": "seed-example", "options": {"rows": 400, "seed": 1}},
                        "target_task": "regress", "shots": 10, "steps": 40, "eval_every": 10, **transfer},
           "tune": {"num_samples": 2, "repeats": 3, "grace_period": 1},
           "checkpoint": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_transfer_runs_each_strategy_as_a_child_run(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path, source["checkpoint"], strategies=["scratch", "linear_probe", "adapter"])
    assert main(["transfer", "--config", config, "--tracking-uri", source["uri"]]) == 0
    out = capsys.readouterr().out
    assert "linear_probe" in out and "anchor: the K labels alone" in out
    client = MlflowClient(source["uri"])
    exp = client.get_experiment_by_name("distributed-mtml-transfer")
    (parent,) = [r for r in client.search_runs([exp.experiment_id], "tags.`mtml.command` = 'transfer'")
                 if "mlflow.parentRunId" not in r.data.tags]
    (probe,) = client.search_runs([exp.experiment_id], "tags.`mtml.strategy` = 'linear_probe'")
    # the source knows this task: its trunk beats the K labels' mean
    assert probe.data.metrics["target/test/mse"] < parent.data.metrics["anchor/test"]
    children = client.search_runs([exp.experiment_id], "tags.`mtml.command` = 'transfer' and tags.`mlflow.parentRunId` != ''")
    assert sorted(r.data.tags["mtml.strategy"] for r in children) == ["adapter", "linear_probe", "scratch"]
    curve = client.get_metric_history(children[0].info.run_id, "target/val/mse")
    assert sorted(m.step for m in curve) == [0, 10, 20, 30, 40]
    test = client.get_metric_history(children[0].info.run_id, "target/test/mse")
    assert [m.step for m in test] == [40]  # scored once, after training


@pytest.mark.e2e
def test_tune_searches_repeats_and_picks_the_known_best_against_an_mlflow_server(source, tmp_path, monkeypatch, capsys, mlflow_server):
    """10 labelled rows of a task the source trunk already knows: starting from the source
    must beat training from scratch, and the table, children and tags land on the server."""
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path, source["checkpoint"], strategies=["scratch", "linear_probe"])
    assert main(["tune", "--config", config, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "best by validation: linear_probe" in out
    assert "[tune] search trials 4/4 |" in out and "[tune] repeat trials 6/6 |" in out  # progress
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("distributed-mtml-transfer")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mtml.command` = 'tune' and tags.`mtml.best_strategy` != ''")
    assert parent.data.tags["mtml.best_strategy"] == "linear_probe" and parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = [(r.data.tags["mtml.stage"], r.data.tags["mtml.strategy"]) for r in children]
    assert stages.count(("search", "scratch")) == 2 and stages.count(("repeat", "linear_probe")) == 3
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:  # selection never sees test: only the repeats score it
        has_test = any(k.startswith("target/test/") for k in r.data.metrics)
        assert "target/val/mse" in r.data.metrics and has_test == (r.data.tags["mtml.stage"] == "repeat")
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert paths == {"tune/results.csv", "tune/results.png"}
    csv = client.download_artifacts(parent.info.run_id, "tune/results.csv", str(tmp_path))
    header, *rows = open(csv).read().splitlines()
    assert header == "strategy,test_mse_mean,test_mse_ci95,val_mse_mean,val_mse_ci95,repeats,seconds"
    assert [r.split(",")[0] for r in rows] == ["scratch", "linear_probe"]


@pytest.mark.e2e
def test_a_trial_can_be_a_two_worker_torch_trainer(source, tmp_path, monkeypatch, capsys, ray_session):
    """And gives back its workers' CPUs: a trial that Tune stopped on its last report left its
    TorchTrainer's placement group behind, so the next distributed trial waited forever on a
    2-CPU Ray (a flaky failure once)."""
    import time

    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path, source["checkpoint"], strategies=["finetune"], steps=20)
    sets = ["tune.workers_per_trial=2", "tune.num_samples=1", "tune.repeats=1"]
    assert main(["tune", "--config", config, "--tracking-uri", source["uri"], *(x for s in sets for x in ("--set", s))]) == 0
    assert "best by validation: finetune" in capsys.readouterr().out
    client = MlflowClient(source["uri"])
    exp = client.get_experiment_by_name("distributed-mtml-transfer")
    (repeat,) = client.search_runs([exp.experiment_id], "tags.`mtml.stage` = 'repeat' and tags.`mtml.strategy` = 'finetune'")
    assert sorted(m.step for m in client.get_metric_history(repeat.info.run_id, "target/val/mse")) == [0, 10, 20]
    assert [m.step for m in client.get_metric_history(repeat.info.run_id, "target/test/mse")] == [20]
    deadline = time.monotonic() + 30  # placement groups are removed asynchronously
    while ray_session.available_resources().get("CPU") != ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held after the tune run: {ray_session.available_resources()}"
        time.sleep(0.5)


@pytest.mark.parametrize("change, message", [
    ({"source": "no-such-run"}, "transfer.source: 'no-such-run' is no checkpoint directory"),
    ({"shots": 5000}, "transfer.shots: 5000 exceeds the"),
    ({"strategies": ["finetune"], "target": {"generator": "mmoe", "options": {"features": 6, "tasks": 2}},
      "target_task": "task0"}, "only 'scratch' and 'adapter' map features"),
])
def test_bad_transfer_configs_exit_2_with_one_line(source, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    ref = change.pop("source", source["checkpoint"])
    config = _write(tmp_path, ref, **change)
    assert main(["transfer", "--config", config, "--tracking-uri", source["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
