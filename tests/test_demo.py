"""`mtml demo` end to end, as a new user runs it: a fresh directory, one command."""

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray


def test_demo_trains_logs_and_says_where_to_look(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_mtml", "demo"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert "[mtml] epoch 8/8" in proc.stdout + proc.stderr  # progress shown while it runs
    assert out.startswith("[mtml] starting a local Ray ...")  # the first seconds are not silent
    assert "Token authentication is enabled" not in proc.stderr  # Ray's own lines are for --verbose
    assert "PreemptionWatcher" not in proc.stderr and "(TrainController pid=" not in out + proc.stderr
    table = out.split("its validation metrics:")[1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:5]}
    assert set(rows) == {"classify", "regress"}
    assert "trivial loss" in table and all(row[-1] == "yes" for row in rows.values())  # beats the train mean / prior
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mtml.config_name"] == "demo"
    assert re.fullmatch(r"demo-[0-9a-f]{6}", run.info.run_name)  # distinct names, one config
    sections = {key.split(".")[0] for key in run.data.params}  # only what a train run reads
    assert {"training", "model", "aggregation", "plan"} <= sections and not sections & {"meta", "transfer", "tune"}
    assert run.data.metrics["val/classify/accuracy"] > 0.85  # the shared trunk learns the article's task
    assert run.data.metrics["val/regress/r2"] > 0.7
    assert abs(run.data.metrics["baseline/val/regress/r2"]) < 0.05 and "baseline/test/classify/accuracy" in run.data.metrics
    # the kept model is the epoch with the lowest val/mean_loss, and the output says which
    history = client.get_metric_history(run.info.run_id, "val/mean_loss")
    best = min(history, key=lambda m: (m.value, m.step))
    assert run.data.tags["mtml.best_epoch"] == str(best.step) and run.data.tags["mtml.stopped_early"] == "false"
    assert run.data.metrics["best/val/mean_loss"] == pytest.approx(best.value, rel=1e-9)
    assert f"the kept model is epoch {best.step + 1}'s" in out
