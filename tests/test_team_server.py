"""Many runs at once on the team's tracking server: PostgreSQL on loopback and MLflow's login app,
started by docker/mlflow-server.sh as the compose file and the cluster manifest start it; and
the same load on a new local SQLite store. Real processes, real databases."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from team_server import Postgres, TeamServer

from distributed_mtml.data.generators import make_suite

pytestmark = pytest.mark.e2e
EPOCHS = 4


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    postgres = Postgres()
    postgres.init()
    postgres.start()
    server = TeamServer(tmp_path_factory.mktemp("mlflow"), postgres)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        postgres.stop()
        postgres.remove()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("suite") / "seed")
    make_suite("seed-example", path, {"rows": 200, "seed": 1})
    return path


def _mtml(env: dict, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distributed_mtml", *argv], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train(root, suite: str, name: str, uri: str, env: dict, workers: int = 0, epochs: int = EPOCHS,
           *extra: str) -> subprocess.Popen:
    """`mtml train` of `suite` as its own process (`extra`: more flags)."""
    config = {"suite": {"path": suite}, "training": {"epochs": epochs, "lr": 0.01},
              "scaling": {"num_workers": workers, "cpus_per_worker": 0.5},
              "checkpoint": {"dir": str(root / "runs"), "every_n_epochs": 1}, "tracking": {"experiment": "together"}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return _mtml(env, "train", "--config", str(path), "--tracking-uri", uri, *extra)


def _finished(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    failed = {name: outputs[name][-2500:] for name, p in procs.items() if p.returncode != 0}
    assert not failed, failed
    return outputs


def _whole(client: MlflowClient, run_id: str, epochs: int = EPOCHS) -> None:
    """Every per-epoch metric of the run reached the store once per epoch: none lost, none twice."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("mtml.unlogged") is None
    for key in run.data.metrics:
        if key.startswith(("train/", "val/")):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(epochs)), (run_id, key, steps)


def test_the_server_refuses_strangers_and_a_wrong_password_in_one_line_before_a_run(team, suite, tmp_path):
    """(The runs of the next tests log with the right login.)"""
    with pytest.raises(MlflowException, match="401|not authenticated"):
        MlflowClient(team.uri).search_experiments()
    wrong = {**team.login(), "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    refused = _train(tmp_path, suite, "wrong", team.uri, wrong)
    out = refused.communicate(timeout=300)[0]
    assert refused.returncode == 2, out[-2000:]
    assert f"error: --tracking-uri {team.uri}: the MLflow server refused user 'admin' (HTTP 401: You are not authenticated" in out
    assert "starting a local Ray" not in out and "epoch" not in out


def test_runs_at_once_on_the_server_all_finish_whole_and_a_killed_one_changes_nothing_else(
        team, suite, tmp_path, monkeypatch):
    """A first run registers its model. Then at once, all logging with a login: two runs (one in
    local mode, one on 2 workers), a Tune search of transfer strategies with parallel trials
    from the first run, `mtml predict` from its registered model, and a fourth run killed with
    SIGKILL once its first epoch is in the store."""
    for key, value in team.login().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(team.uri)
    _finished({"source": _train(tmp_path, suite, "source", team.uri, team.login(), 0, EPOCHS, "--register", "team-model")})
    tune = tmp_path / "tune.yaml"
    tune.write_text(yaml.safe_dump({
        "transfer": {"source": "source", "target": {"path": suite}, "target_task": "regress", "shots": 10,
                     "strategies": ["scratch", "linear_probe"], "steps": 20, "eval_every": 10},
        "tune": {"num_samples": 1, "repeats": 2, "grace_period": 1, "cpus_per_trial": 0.5},
        "tracking": {"experiment": "together"}, "checkpoint": {"dir": str(tmp_path / "runs")}}))
    victim = _train(tmp_path, suite, "victim", team.uri, team.login())
    procs = {name: _train(tmp_path, suite, name, team.uri, team.login(), workers)
             for name, workers in (("local", 0), ("workers", 2))}
    procs["tune"] = _mtml(team.login(), "tune", "--config", str(tune), "--tracking-uri", team.uri)
    procs["predict"] = _mtml(team.login(), "predict", "--model", "models:/team-model/1", "--input",
                             os.path.join(suite, "regress.parquet"), "--out", str(tmp_path / "predicted"),
                             "--tracking-uri", team.uri)
    _first_epoch_stored(client, "victim")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    _finished(procs)
    experiment = client.get_experiment_by_name("together").experiment_id
    for name in ("source", "local", "workers"):
        (run,) = client.search_runs([experiment], f"tags.`mtml.config_name` = '{name}'")
        _whole(client, run.info.run_id)
    (killed,) = client.search_runs([experiment], "tags.`mtml.config_name` = 'victim'")
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no cleanup to run; --resume continues it
    assert os.listdir(tmp_path / "predicted")
    transfer = client.get_experiment_by_name("together-transfer").experiment_id
    (parent,) = client.search_runs([transfer], "tags.`mtml.command` = 'tune' and tags.`mtml.best_strategy` != ''")
    children = client.search_runs([transfer], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and {child.data.tags["mtml.stage"] for child in children} == {"search", "repeat"}
    assert all(child.info.status == "FINISHED" for child in children)


def _first_epoch_stored(client: MlflowClient, config_name: str) -> str:
    """The run of `config_name` once its first epoch's val loss is in the store: its id."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("together")
        runs = [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                                f"tags.`mtml.config_name` = '{config_name}'")
        if runs and client.get_metric_history(runs[0].info.run_id, "val/mean_loss"):
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no epoch of {config_name} reached the store in 300 s")


def test_the_database_stopped_and_started_again_mid_run_loses_no_metric(team, suite, tmp_path, monkeypatch):
    """PostgreSQL goes away behind the server for 5 s: the reports it refuses wait in the run's
    spool and reach the store once it is back; the run finishes with its model."""
    for key, value in team.login().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(team.uri)
    proc = _train(tmp_path, suite, "outage", team.uri, team.login(), epochs=12)
    run_id = _first_epoch_stored(client, "outage")
    team.postgres.stop()
    time.sleep(5)
    team.postgres.start()
    _finished({"outage": proc})
    _whole(client, run_id, epochs=12)


def test_runs_started_together_on_a_new_local_store_all_finish_and_leave_it_whole(suite, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = {name: _train(tmp_path, suite, name, uri, {}) for name in ("a", "b", "c")}
    _finished(procs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert len(runs) == 3
    for run in runs:
        _whole(client, run.info.run_id)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
