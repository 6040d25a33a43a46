"""Integration: the commands submitted as Ray jobs, as on a cluster. A real head node (`ray start
--head` on loopback, with the token authentication Ray 2.60 turns on by default), a real `mlflow
server`, the shipped runtime environment and the `ray job` CLI a user types."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from conftest import free_port, logged_model_files, wait_for_port
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT_FLAGS = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
              "node-manager-port", "object-manager-port"]
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture
def ray_head(monkeypatch):
    """A second Ray cluster beside the tests' own: every port chosen free, and a temp dir of its
    own, short enough for Ray's socket paths, so that no other `ray.init()` finds its address
    file. Its processes share one process group, killed at the end."""
    ports = {flag: free_port() for flag in PORT_FLAGS}
    temp_dir = tempfile.mkdtemp(prefix="mtmlhead", dir="/tmp")
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *(f"--{flag}={port}" for flag, port in ports.items())]
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{ports['dashboard-port']}")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what the README tells the submitting shell
    try:
        wait_for_port(ports["dashboard-port"], 120)
        for _ in range(60):  # the dashboard listens before its job module answers
            if subprocess.run(["ray", "job", "list"], capture_output=True, timeout=60).returncode == 0:
                break
            time.sleep(1)
        yield
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # a graceful `ray stop` takes half a minute; the temp dir goes too
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(*args: str) -> str:
    """The `ray job` CLI, as a user runs it (in its own process: it reads the token file itself,
    untouched by the Ray state of this test process)."""
    out = subprocess.run(["ray", "job", *args], capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def _status(job_id: str) -> str:
    """The CLI says it in words ('succeeded', 'was stopped', 'is currently running')."""
    found = re.search(r"\b(pending|running|stopped|succeeded|failed)\b", _ray_job("status", job_id), re.IGNORECASE)
    return found.group(1).upper() if found else "UNKNOWN"


def _logs(job_id: str) -> str:
    return _ray_job("logs", job_id)[-3000:]


def _runtime_env(tmp_path, tracking_uri: str) -> str:
    """The shipped runtime environment, pointed at the test's tracking server."""
    with open(os.path.join(REPO, "jobs", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    env["env_vars"]["MLFLOW_TRACKING_URI"] = tracking_uri
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return str(path)


def _submit(runtime_env: str, *command: str) -> str:
    out = subprocess.run(["ray", "job", "submit", "--no-wait", "--runtime-env", runtime_env, "--", *command],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)


def _wait(job_id: str, seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    while (status := _status(job_id)) not in DONE and time.monotonic() < deadline:
        time.sleep(2)
    return status


def _train_config(tmp_path, seed_suite) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "suite": {"path": seed_suite}, "training": {"epochs": 40, "batch_size": 16, "lr": 0.01, "report_every_s": 0},
        "scaling": {"num_workers": 2}, "checkpoint": {"dir": str(tmp_path / "runs")}}))
    return str(path)


def _tune_config(tmp_path, source: str) -> str:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "transfer": {"source": source, "target_task": "regress", "shots": 10, "steps": 20, "eval_every": 10,
                     "target": {"generator": "seed-example", "options": {"rows": 400, "seed": 1, "variant": 1}},
                     "strategies": ["scratch", "linear_probe"]},
        "tune": {"num_samples": 1, "repeats": 2, "grace_period": 1},
        "checkpoint": {"dir": str(tmp_path / "runs")}}))
    return str(path)


def _epochs_logged(client: MlflowClient, run_id: str) -> int:
    return len(client.get_metric_history(run_id, "train/classify/loss"))


def _only_run(client: MlflowClient, where: str, experiment: str = "distributed-mtml"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], where) if exp else []
    return runs[0] if len(runs) == 1 else None


def test_train_stop_resume_and_tune_as_ray_jobs(ray_head, mlflow_server, tmp_path, seed_suite):
    runs = MlflowClient(mlflow_server)
    env = _runtime_env(tmp_path, mlflow_server)
    train = ("mtml", "train", "--config", _train_config(tmp_path, seed_suite), "--address", "auto")

    # 1. A long training job, stopped with `ray job stop` once two epochs are checkpointed.
    first = _submit(env, *train)
    deadline = time.monotonic() + 300
    while not ((run := _only_run(runs, "tags.`mtml.command` = 'train'")) and _epochs_logged(runs, run.info.run_id) >= 2):
        assert time.monotonic() < deadline and _wait(first, 0) not in DONE, _logs(first)
        time.sleep(1)
    _ray_job("stop", first)
    assert _wait(first) == "STOPPED"
    killed = runs.get_run(run.info.run_id)
    assert killed.info.status == "KILLED", _logs(first)
    done = _epochs_logged(runs, run.info.run_id)

    # 2. The same job with --resume finishes the same MLflow run from its checkpoint.
    second = _submit(env, *train, "--resume", "--set", f"training.epochs={done + 1}")
    assert _wait(second) == "SUCCEEDED", _logs(second)
    resumed = runs.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    steps = sorted(m.step for m in runs.get_metric_history(run.info.run_id, "train/classify/loss"))
    assert steps == list(range(done + 1))
    assert "MLmodel" in logged_model_files(mlflow_server, run.info.run_id)
    registered = subprocess.run([sys.executable, "-m", "distributed_mtml", "register", "--run", run.info.run_id,
                                 "--name", "cluster-model", "--tracking-uri", mlflow_server],
                                capture_output=True, text=True, timeout=120)
    assert "models:/cluster-model/1" in registered.stdout, registered.stderr[-2000:]

    # 3. A tune job transferring from that model (by its registry name), its trials on the head's workers.
    third = _submit(env, "mtml", "tune", "--config", _tune_config(tmp_path, "models:/cluster-model/1"), "--address", "auto")
    assert _wait(third) == "SUCCEEDED", _logs(third)
    parent = _only_run(runs, "tags.`mtml.best_strategy` != ''", "distributed-mtml-transfer")
    assert parent is not None and parent.info.status == "FINISHED"
    # the best strategy is the one with the lowest mean validation MSE in the logged table
    csv = runs.download_artifacts(parent.info.run_id, "tune/results.csv", str(tmp_path))
    header, *rows = [line.split(",") for line in open(csv).read().splitlines()]
    by_val = min(rows, key=lambda r: float(r[header.index("val_mse_mean")]))[0]
    assert len(rows) == 2 and parent.data.tags["mtml.best_strategy"] == by_val
    assert f"best by validation: {by_val}" in _logs(third)
