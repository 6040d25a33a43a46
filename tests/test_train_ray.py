"""Integration: real 2-worker TorchTrainer runs on a local Ray, read back through MlflowClient."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import logged_model_files
from mlflow.tracking import MlflowClient

from distributed_mtml.artifacts import model_dir, model_from_run
from distributed_mtml.config import load_config, validate_config
from distributed_mtml.evaluate import evaluate
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.launch import run_training

pytestmark = pytest.mark.ray


def _config(tmp_path, suite, **sections):
    raw = {
        "suite": {"path": suite},
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"every_n_epochs": 1, "dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_config(raw)


def _tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db")


def test_two_workers_train_and_log_everything(ray_session, tmp_path, seed_suite, capsys):
    """Also the report cadence: with `training.report_every_s` out of reach, the workers report
    at the checkpoint every 3 epochs and at the end (a best epoch in between adds a report of
    its own), yet every epoch's metrics reach MLflow once, at its own step, and the kept model
    is the best epoch's."""
    config = _config(tmp_path, seed_suite, training={"epochs": 5, "report_every_s": 1e6}, checkpoint={"every_n_epochs": 3})
    out = run_training(config, "itest", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mtml.command"] == "train" and run.data.tags["mtml.suite"] == "seed-example"
    assert run.data.params["training.lr"] == "0.01" and run.data.params["scaling.num_workers"] == "2"
    for key in ["val/classify/accuracy", "val/classify/auc", "val/regress/mse", "val/regress/mae",
                "val/regress/r2", "val/mean_loss", "throughput/samples_per_s"]:
        assert key in run.data.metrics, key
    for key in ("train/regress/loss", "val/mean_loss", "throughput/samples_per_s"):
        assert sorted(m.step for m in client.get_metric_history(out.run_id, key)) == [0, 1, 2, 3, 4], key
    val = [m.value for m in sorted(client.get_metric_history(out.run_id, "val/mean_loss"), key=lambda m: m.step)]
    assert val[-1] < val[0]
    assert run.data.tags["mtml.best_epoch"] == str(val.index(min(val)))
    progress = re.findall(r"\[mtml\] epoch (\d)/5", capsys.readouterr().out)
    assert progress[-1] == "5" and len(progress) <= 4  # one line per report, not per epoch
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "suite.yaml", "plots"} <= artifacts
    assert {"MLmodel", "artifacts", "code"} <= logged_model_files(_tracker(tmp_path).uri, out.run_id)
    assert {a.path for a in client.list_artifacts(out.run_id, "plots")} == {"plots/classify.png", "plots/regress.png"}
    model = model_from_run(out.run_id, _tracker(tmp_path))
    test = evaluate(model, seed_suite)
    assert test["test/classify/accuracy"] > 0.6 and test["test/regress/r2"] > 0.0
    for key, value in test.items():  # the run logged its kept model's test numbers
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key
    # the logged model scores on val exactly what its epoch logged, and evaluate --split val says so
    history = client.get_metric_history(out.run_id, "val/regress/mse")
    logged = next(m.value for m in history if m.step == int(run.data.tags["mtml.best_epoch"]))
    assert evaluate(model, seed_suite, "val")["val/regress/mse"] == pytest.approx(logged, rel=1e-5)
    from distributed_mtml.cli import main

    capsys.readouterr()
    assert main(["evaluate", "--run", out.run_id, "--suite", seed_suite, "--split", "val", "--tracking-uri", _tracker(tmp_path).uri]) == 0
    assert f"val split of {seed_suite} (trivial:" in capsys.readouterr().out


def test_more_tasks_than_workers_with_different_feature_widths(ray_session, tmp_path):
    from distributed_mtml.data.generators import make_suite

    suite = str(tmp_path / "mmoe")
    make_suite("mmoe", suite, {"tasks": 3, "features": 8, "rows": 150})
    raw = yaml.safe_load(open(f"{suite}/suite.yaml"))
    raw["tasks"][2]["features"] = ["x0", "x1", "x2", "x3"]  # task2 is narrower: it gets an adapter
    yaml.safe_dump(raw, open(f"{suite}/suite.yaml", "w"))
    out = run_training(_config(tmp_path, suite, training={"epochs": 2}), "placed", _tracker(tmp_path))
    params = _tracker(tmp_path).client().get_run(out.run_id).data.params
    assert params["plan.placement"] == str([["task0", "task2"], ["task1"]])
    assert {f"val/task{i}/r2" for i in range(3)} <= set(out.metrics)


def test_single_worker_on_raw_tables_standardises_by_the_train_split(ray_session, tmp_path, raw_suite):
    """No split column, string labels, features and target in the thousands: the saved model
    carries the train split's statistics (a column's pooled over the tasks that read it) and
    class names, and metrics come in the price's units."""
    import numpy as np
    import torch

    from distributed_mtml.data.tasks import load_suite_spec, load_task

    config = _config(tmp_path, raw_suite, scaling={"num_workers": 0}, training={"epochs": 10})  # local mode: no DDP here
    out = run_training(config, "one", _tracker(tmp_path))
    model = model_from_run(out.run_id, _tracker(tmp_path))
    cls, reg = (load_task(raw_suite, t) for t in load_suite_spec(raw_suite).tasks)
    prep = model.preprocessing["reg"]
    assert model.preprocessing["cls"].classes == ["no", "yes"]
    pooled = np.concatenate([cls.x["train"], reg.x["train"]]).astype(np.float64)  # both tasks read a, b, c
    assert prep.feature_mean == pytest.approx(pooled.mean(0).tolist(), rel=1e-5)
    assert model.preprocessing["cls"].feature_std == pytest.approx(pooled.std(0).tolist(), rel=1e-4)
    assert prep.target_mean == pytest.approx(float(reg.y["train"].mean()), rel=1e-5)
    test = evaluate(model, raw_suite)
    with torch.no_grad():  # by hand: standardise the raw rows, predict, back to the price's units
        x = (reg.x["test"] - np.array(prep.feature_mean)) / np.array(prep.feature_std)
        pred = model("reg", torch.tensor(x, dtype=torch.float32)).squeeze(-1).double() * prep.target_std + prep.target_mean
    assert test["test/reg/mse"] == pytest.approx(float(((pred.numpy() - reg.y["test"]) ** 2).mean()), rel=1e-4)
    assert test["test/cls/accuracy"] > 0.8 and test["test/reg/r2"] > 0.5
    assert out.metrics["val/reg/loss"] < 1 < out.metrics["val/reg/mse"]  # loss standardised, mse in units


@pytest.mark.e2e  # resuming in the everyday tier: test_local_mode_trains_as_one_worker_does_and_resumes
def test_resume_continues_from_the_last_checkpoint(ray_session, tmp_path, seed_suite, capsys):
    tracker = _tracker(tmp_path)
    first = run_training(_config(tmp_path, seed_suite, training={"epochs": 2}), "resumable", tracker)
    client = tracker.client()
    client.set_terminated(first.run_id, status="KILLED")  # as if interrupted after epoch 2
    again = run_training(_config(tmp_path, seed_suite, training={"epochs": 4}), "resumable", tracker, resume=True)
    assert again.run_id == first.run_id
    name = client.get_run(first.run_id).info.run_name
    assert name.startswith("resumable-")  # the config's name and a suffix
    assert f"[mtml] resuming run {first.run_id} ('{name}') after epoch 2 (checkpoint" in capsys.readouterr().out
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "train/classify/loss"))
    assert steps == [0, 1, 2, 3]  # epochs 0-1 from the first attempt, 2-3 after resuming
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 240 KiB tmpfs: room for one checkpoint of the seed model, not for two. Needs the
    right to mount (root in a container that allows it); skipped, saying so, elsewhere."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.e2e
def test_full_disk_fails_clearly_and_keeps_the_last_whole_checkpoint(ray_session, tmp_path, seed_suite, tiny_disk):
    """The checkpoint disk fills up during training: the run ends FAILED with one line saying
    so and naming the last complete checkpoint, which still loads; the partial one is never
    taken for it."""
    from distributed_mtml.artifacts import load_model
    from distributed_mtml.errors import TrainingFailed
    from distributed_mtml.runtime.checkpoint import latest_checkpoint

    cfg = _config(tmp_path, seed_suite, training={"epochs": 6}, checkpoint={"dir": str(tiny_disk), "num_to_keep": 5})
    with pytest.raises(TrainingFailed, match="No space left on device") as failed:
        run_training(cfg, "full", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FAILED"
    last = latest_checkpoint(str(tiny_disk), f"full-{run.info.run_id[:12]}")
    assert last is not None and f"last checkpoint {last} (continue with --resume)" in str(failed.value)
    model, _ = load_model(last)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bad_suite_exits_2_before_ray_starts(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"suite: {{path: {tmp_path}/missing}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_mtml", "train", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}/missing/suite.yaml: file not found"
    assert not os.path.exists(tmp_path / "mlflow.db")  # nothing started, nothing logged


def test_unreachable_tracking_server_exits_2_before_ray_starts(tmp_path, seed_suite):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "c.yaml"
    config.write_text(f"suite: {{path: {seed_suite}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_mtml", "train", "--config", str(config),
         "--tracking-uri", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --tracking-uri http://127.0.0.1:{port}: the MLflow server does not answer")
    assert not os.path.exists(tmp_path / "mtml_runs")  # no Ray Train run was started


def test_local_sgd_sync_every_trains_in_bf16(ray_session, tmp_path, seed_suite):
    cfg = _config(tmp_path, seed_suite, training={"epochs": 3, "sync_every": 4, "precision": "bf16"})
    out = run_training(cfg, "localsgd", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    val = [m.value for m in sorted(client.get_metric_history(out.run_id, "val/mean_loss"), key=lambda m: m.step)]
    assert val[-1] < val[0]
    test = evaluate(model_from_run(out.run_id, _tracker(tmp_path)), seed_suite)
    assert test["test/classify/accuracy"] > 0.6


@pytest.mark.e2e
def test_a_killed_worker_restarts_from_its_checkpoint_with_the_method_and_monitor_state(ray_session, tmp_path,
                                                                                        seed_suite, monkeypatch):
    """SIGKILL rank 1 at epoch 2 (`MTML_FAULT`, what the OOM killer does): with max_failures the
    group restarts from epoch 1's checkpoint, and
    - the run finishes with every epoch logged once and the restart recorded, its final metrics
      equal to an uninterrupted run's with the same seed (batches and dropout are seeded per
      epoch, optimiser state is checkpointed). It trains with FAMO, whose logits, their Adam
      moments and last losses are the same on both ranks (each step all-reduces every task's
      loss): restored wrong, the weights and so the metrics would differ. Every stateful method's
      checkpoint round trip: test_elastic_state.
    - monitoring val/mean_loss in 'max' mode makes an early epoch the best (the loss falls), so
      the kept model is not the last one; with patience 2 the run stops 2 epochs after it. The
      restarted group carries on the saved monitor state (a fresh one would take epoch 2 as the
      best), and the logged model is the best epoch's checkpoint."""
    import torch

    sections = {"training": {"epochs": 10, "steps_per_epoch": 40, "early_stopping_patience": 2},
                "checkpoint": {"every_n_epochs": 1, "mode": "max", "max_failures": 1, "num_to_keep": 1},
                "aggregation": {"method": "famo"}}
    monkeypatch.setenv("MTML_FAULT", "sigkill@2:0:1")
    out = run_training(_config(tmp_path, seed_suite, **sections), "crashy", _tracker(tmp_path))
    monkeypatch.delenv("MTML_FAULT")
    client = _tracker(tmp_path).client()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mtml.restarts"] == "1"
    assert "died" in run.data.tags["mtml.last_worker_error"]
    history = sorted(client.get_metric_history(out.run_id, "val/mean_loss"), key=lambda m: m.step)
    best = max(history, key=lambda m: (m.value, -m.step))
    assert [m.step for m in history] == list(range(best.step + 3))  # stopped 2 epochs after the best
    assert sorted(m.step for m in client.get_metric_history(out.run_id, "train/classify/loss")) == list(range(best.step + 3))
    assert run.data.tags["mtml.best_epoch"] == str(best.step) == str(out.best_step)
    assert run.data.tags["mtml.stopped_early"] == "true" and out.stopped_early
    assert run.data.metrics["best/val/mean_loss"] == pytest.approx(best.value, rel=1e-9)
    # the logged model is the best epoch's checkpoint (kept by Ray's scoring beside the latest)
    runs = tmp_path / "runs" / f"crashy-{out.run_id[:12]}"
    kept = torch.load(runs / f"checkpoint_epoch={best.step:04d}" / "trunk.pt", weights_only=True)
    last = torch.load(runs / f"checkpoint_epoch={history[-1].step:04d}" / "trunk.pt", weights_only=True)
    with model_dir(out.run_id, None, _tracker(tmp_path)) as directory:
        logged = torch.load(os.path.join(directory, "trunk.pt"), weights_only=True)
    assert all(torch.equal(logged[k], kept[k]) for k in kept) and not all(torch.equal(last[k], kept[k]) for k in kept)
    calm = run_training(_config(tmp_path, seed_suite, **sections), "calm", _tracker(tmp_path))
    for key in ("val/classify/loss", "val/regress/loss", "train/regress/loss"):
        assert out.metrics[key] == pytest.approx(calm.metrics[key], rel=1e-5), key


def test_a_cluster_without_the_gpus_fails_the_run_after_resource_wait(ray_session, tmp_path, seed_suite, capsys):
    """Joined to a running Ray without GPUs (as with --address), GPU workers are not bad input
    (an autoscaler may add GPU nodes) but must not wait for ever: after scaling.resource_wait_s
    the run is FAILED with one line saying what is missing."""
    from distributed_mtml.errors import TrainingFailed

    cfg = _config(tmp_path, seed_suite, scaling={"use_gpu": True, "resource_wait_s": 1})
    with pytest.raises(TrainingFailed, match=r"did not provide 2 GPU for 2 workers within scaling.resource_wait_s=1 s"):
        run_training(cfg, "no-gpus", _tracker(tmp_path))
    assert "[mtml] waiting up to 1 s for the cluster to provide 2 GPU" in capsys.readouterr().out
    client = _tracker(tmp_path).client()
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.e2e
def test_tracking_server_going_away_mid_run_loses_nothing(ray_session, tmp_path, seed_suite, mlflow_server):
    """The tracking server becomes unreachable after two epochs (its port closes, open
    connections drop) and comes back a few epochs later: training goes on meanwhile, the
    reports it missed are kept on disk and sent when it answers, and the run ends FINISHED
    with every epoch logged once."""
    import threading
    import time

    from conftest import Outage

    relay = Outage(int(mlflow_server.rsplit(":", 1)[1]))
    spool = []

    def outage():
        client, deadline = MlflowClient(mlflow_server), time.time() + 120
        while time.time() < deadline:
            exp = client.get_experiment_by_name("distributed-mtml")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/classify/loss")) >= 2:
                break
            time.sleep(0.1)
        relay.cut()
        while time.time() < deadline and not spool:
            spool.extend((tmp_path / "runs").glob("*/unlogged_metrics.jsonl"))
            time.sleep(0.1)
        time.sleep(2)  # a few more reports while it is away
        relay.restore()

    chaos = threading.Thread(target=outage, daemon=True)
    chaos.start()
    out = run_training(_config(tmp_path, seed_suite, training={"epochs": 10, "steps_per_epoch": 40}),
                       "outage", Tracker(relay.uri))
    chaos.join()
    assert spool, "no report was kept: the outage did not happen during training"
    client = MlflowClient(mlflow_server)
    assert client.get_run(out.run_id).info.status == "FINISHED"
    for key in ("train/classify/loss", "val/regress/loss"):
        assert sorted(m.step for m in client.get_metric_history(out.run_id, key)) == list(range(10)), key
    assert not spool[0].exists()  # all sent


def _cli_train(tmp_path, suite, env: dict) -> subprocess.CompletedProcess:
    """`mtml train` in its own process with its own local Ray, as a user runs it."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "suite": {"path": suite}, "training": {"epochs": 4, "batch_size": 16, "steps_per_epoch": 10},
        "scaling": {"num_workers": 2}, "checkpoint": {"dir": str(tmp_path / "runs"), "every_n_epochs": 1}}))
    command = [sys.executable, "-m", "distributed_mtml", "train", "--config", str(config), "--tracking-uri", _tracker(tmp_path).uri]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, **env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})


@pytest.mark.e2e
def test_worker_exit_without_restarts_names_the_worker_and_the_checkpoint(ray_session, tmp_path, seed_suite):
    """A worker calling os._exit(1) mid-epoch with max_failures 0: one line naming the dead rank
    and the checkpoint to resume from, exit 1, run FAILED; then resuming finishes it (in this
    process, on the tests' Ray: the README tour resumes through the command)."""
    proc = _cli_train(tmp_path, seed_suite, {"MTML_FAULT": "exit@2:5:1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "training failed: " in line and "rank 1: The actor is dead because its worker process has died" in line
    client = _tracker(tmp_path).client()
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FAILED" and "mtml.restarts" not in run.data.tags
    # the newest registered when the worker died: epoch 1's, or epoch 0's if Ray had not yet recorded it
    assert re.search(r"last checkpoint \S+/checkpoint_epoch=000[01] \(continue with --resume\)", line), line
    resumed = run_training(load_config(str(tmp_path / "c.yaml")), "c", _tracker(tmp_path), resume=True)
    assert resumed.run_id == run.info.run_id and client.get_run(run.info.run_id).info.status == "FINISHED"


def test_non_finite_loss_fails_the_run_naming_task_and_step(ray_session, tmp_path, seed_suite, monkeypatch):
    """NaN features reach task 'regress' (rank 1) at epoch 2, step 3; DDP spreads the NaN to
    every rank a step later, yet the error names the first task and step, the run is FAILED and
    the epoch-1 checkpoint is the last one, intact."""
    from distributed_mtml.artifacts import load_model
    from distributed_mtml.errors import TrainingFailed
    from distributed_mtml.runtime.checkpoint import latest_checkpoint

    monkeypatch.setenv("MTML_FAULT", "nan@2:3:1")
    cfg = _config(tmp_path, seed_suite, training={"epochs": 4, "steps_per_epoch": 10})
    with pytest.raises(TrainingFailed, match=r"non-finite loss in task 'regress' at epoch 2, step 3") as failed:
        run_training(cfg, "diverges", _tracker(tmp_path))
    assert "checkpoint_epoch=0001 (continue with --resume)" in str(failed.value)
    client = _tracker(tmp_path).client()
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FAILED"
    last = latest_checkpoint(str(tmp_path / "runs"), f"diverges-{run.info.run_id[:12]}")
    assert last.endswith("checkpoint_epoch=0001")
    model, _ = load_model(last)
    assert all(bool(p.isfinite().all()) for p in model.parameters())


# One method of each kind (see `aggregation`): within a kind, a run differs only by the weights
# function, and every gradient method's exchange across ranks is checked against its
# single-process reference in test_aggregation. PCGrad runs end to end in the README tour, DWA below.
@pytest.mark.parametrize("method", ["mgda", "graddrop"])  # a loss weighting: DWA's test below
def test_conflict_aware_methods_end_to_end(ray_session, tmp_path, seed_suite, method):
    cfg = _config(tmp_path, seed_suite, training={"epochs": 2}, aggregation={"method": method})
    out = run_training(cfg, f"agg-{method}", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mtml.aggregation"] == method and run.data.params["aggregation.method"] == method
    assert {"aggregation/classify/weight", "aggregation/regress/weight"} <= set(run.data.metrics)
    assert {"plots", "config.yaml"} <= {a.path for a in client.list_artifacts(out.run_id)}
    assert "MLmodel" in logged_model_files(_tracker(tmp_path).uri, out.run_id)
    assert run.data.metrics["val/classify/accuracy"] > 0.6  # learned something (chance is about 0.5)


def test_dwa_weights_are_equal_for_two_epochs_then_follow_the_loss_ratios(ray_session, tmp_path, seed_suite):
    cfg = _config(tmp_path, seed_suite, training={"epochs": 3}, aggregation={"method": "dwa"})
    out = run_training(cfg, "agg-dwa", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    history = {
        task: [m.value for m in sorted(client.get_metric_history(out.run_id, f"aggregation/{task}/weight"), key=lambda m: m.step)]
        for task in ("classify", "regress")
    }
    assert history["classify"][:2] == [0.5, 0.5] and history["regress"][:2] == [0.5, 0.5]
    # epoch 2: K softmax(r / T) / K with r = L(1) / L(0) of each task's epoch-mean training loss,
    # which each worker only has for its own task: the weights need both, gathered across workers
    import math

    losses = {t: [m.value for m in sorted(client.get_metric_history(out.run_id, f"train/{t}/loss"), key=lambda m: m.step)]
              for t in ("classify", "regress")}
    ratio = {t: losses[t][1] / losses[t][0] / 2.0 for t in losses}  # T = 2
    expected = math.exp(ratio["classify"]) / (math.exp(ratio["classify"]) + math.exp(ratio["regress"]))
    assert history["classify"][2] == pytest.approx(expected, rel=1e-5)
    assert history["regress"][2] == pytest.approx(1 - expected, rel=1e-5)


def test_affinity_ranks_within_pair_above_across_and_groups_the_pairs(ray_session, tmp_path, capsys):
    """mmoe, 4 tasks in two pairs (correlation 0.9 within, 0 across), two tasks per worker
    with each pair split across workers: TAG affinity must find the pairs."""
    from distributed_mtml.cli import main
    from distributed_mtml.data.generators import make_suite
    from distributed_mtml.relations import from_csv

    suite = str(tmp_path / "pairs")
    make_suite("mmoe", suite, {"tasks": 4, "groups": 2, "correlation": 0.9, "features": 12, "sines": 2, "rows": 600, "seed": 1})
    # the model the pairs were measured on: a plain trunk (with the default passthrough trunk the heads
    # also read the inputs, and one of the four recipients ranked its partner 0.5% below a stranger)
    cfg = _config(tmp_path, suite, training={"epochs": 6, "lr": 0.003, "steps_per_epoch": 150},
                  relations={"enabled": True, "every_n_steps": 10},
                  model={"trunk": {"passthrough": False}, "head_penalty": "auto"})
    out = run_training(cfg, "pairs", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    assert {"relations/affinity.csv", "relations/cosine.csv", "relations/affinity.png", "relations/cosine.png"} <= {
        a.path for a in client.list_artifacts(out.run_id, "relations")}
    values, order = from_csv(open(client.download_artifacts(out.run_id, "relations/affinity.csv", str(tmp_path))).read())
    assert order == ["task0", "task1", "task2", "task3"]
    partner = {0: 1, 1: 0, 2: 3, 3: 2}
    for j in range(4):  # for every recipient, its partner helps more than either task of the other pair
        others = [i for i in range(4) if i not in (j, partner[j])]
        assert values[partner[j], j] > max(values[i, j] for i in others), values
    assert main(["affinity", "--run", out.run_id, "--tracking-uri", _tracker(tmp_path).uri]) == 0
    printed = capsys.readouterr().out
    assert "2 groups" in printed and "{task0, task1} | {task2, task3}" in printed
    assert "relations/groupings.txt" in {a.path for a in client.list_artifacts(out.run_id, "relations")}


def _dataset_readers(ray) -> dict[tuple[str, str], set[str]]:
    """(dataset name, Ray's id of it) -> the log files of the processes that executed it: Ray
    Data says "Starting execution of Dataset <name>_<id>_<n>" in the log of the process that
    iterates a dataset (the reads themselves run in its read tasks)."""
    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    found: dict[tuple[str, str], set[str]] = {}
    for name in os.listdir(logs):
        if name.startswith("worker-") and name.endswith((".out", ".err")):
            with open(os.path.join(logs, name), errors="replace") as f:
                for m in re.finditer(r"Starting execution of Dataset ((?:train|val)-.+?)_([0-9A-Za-z]+)_\d+\.", f.read()):
                    found.setdefault((m[1], m[2]), set()).add(name[:-4])
    return found


@pytest.mark.e2e
def test_streamed_tasks_train_through_ray_data(ray_session, tmp_path, seed_suite):
    """`data.max_in_memory_mb: 0` streams every task: each worker reads its own task's Ray
    dataset (the train split filtered at the read), running out and starting a next pass within
    an epoch; validation and test are streamed too, and a row without a label is left out of
    each (a tenth of regress's rows here). A task without a split column cannot be streamed:
    exit 2 before Ray starts."""
    path = f"{seed_suite}/regress.parquet"
    table = pq.read_table(path)
    y = table.column("y").to_numpy().copy()
    y[::10] = np.nan
    pq.write_table(table.set_column(table.column_names.index("y"), "y", pa.array(y)), path)
    config = _config(tmp_path, seed_suite, data={"max_in_memory_mb": 0, "shuffle_buffer_rows": 50, "standardize": "task"},
                     training={"epochs": 2, "batch_size": 16, "steps_per_epoch": 12, "lr": 0.02},
                     model={"heads": "separate", "architecture": "mmoe", "experts": 2})
    # separate heads: the model whose epoch 1 improves on epoch 0 (see `best` below); mmoe: a task's
    # gate streams with its task (the other tests stream `hard`)
    before = _dataset_readers(ray_session)
    out = run_training(config, "streamed", _tracker(tmp_path))
    readers = {name: logs for name, logs in _dataset_readers(ray_session).items() if name not in before}
    for task in ("classify", "regress"):  # the owner reads its task's train and val datasets; no other worker does
        assert {kind for kind, _ in readers if kind.endswith(f"-{task}")} == {f"train-{task}", f"val-{task}"}
        assert len(set().union(*(logs for (kind, _), logs in readers.items() if kind.endswith(f"-{task}")))) == 1
    assert len(set().union(*readers.values())) == 2  # two workers, one task each
    run = _tracker(tmp_path).client().get_run(out.run_id)
    assert run.data.tags["mtml.streamed"] == "classify,regress"
    assert run.data.params["plan.placement"] == "[['classify'], ['regress']]"
    client = _tracker(tmp_path).client()
    assert [m.step for m in client.get_metric_history(out.run_id, "train/regress/loss")] == [0, 1]
    for key in ("val/classify/accuracy", "val/regress/mse", "test/classify/auc", "test/regress/r2"):
        assert math.isfinite(out.metrics[key]), key
    assert out.metrics["val/regress/r2"] > 0.1  # it learned from the stream
    best = int(run.data.tags["mtml.best_epoch"])
    assert best >= 1  # so its val metrics came from the val split held after epoch 0's pass
    again = evaluate(model_from_run(out.run_id, _tracker(tmp_path)), seed_suite, "val")
    for key in ("val/classify/accuracy", "val/classify/auc", "val/regress/mse"):
        logged = {m.step: m.value for m in client.get_metric_history(out.run_id, key)}
        assert logged[best] == pytest.approx(again[key], rel=1e-6, abs=1e-9), key

    from conftest import write_raw_suite

    from distributed_mtml.errors import InputError

    raw = write_raw_suite(str(tmp_path / "raw"))
    with pytest.raises(InputError, match="is streamed .* needs a split column 'split'"):
        run_training(_config(tmp_path, raw, data={"max_in_memory_mb": 0}), "raw", _tracker(tmp_path))


def test_a_small_streamed_split_is_held_after_one_pass_and_a_large_one_is_not(monkeypatch):
    import torch

    from distributed_mtml.train import worker

    batches = [(torch.ones(4, 3), torch.zeros(4)) for _ in range(3)]  # 64 bytes each
    held: dict = {}
    same = lambda got: len(got) == 3 and all(g[0] is w[0] and g[1] is w[1] for g, w in zip(got, batches))  # noqa: E731
    assert same(list(worker._held_after_one_pass(iter(batches), held, "val-a")))
    assert list(held) == ["val-a"] and same(held["val-a"])
    monkeypatch.setattr(worker, "HOLD_SPLIT_MB", 150 / 2**20)  # two batches fit, three do not
    assert len(list(worker._held_after_one_pass(iter(batches), held, "val-b"))) == 3 and "val-b" not in held


@pytest.mark.e2e
def test_a_streamed_task_continues_its_pass_across_epochs_and_repeats_after_a_restart(ray_session, seed_suite):
    """A streamed task's batches are one seeded sequence of passes: epochs continue the pass the
    last one left (no row twice within a pass), and a fresh reader of epoch 1 (a worker
    restarted from a checkpoint) sees exactly what the first reader saw. The dataset's blocks
    have one chunk per column though the file has a row group per 50 rows: a block of many
    chunks is joined in the worker's private memory, whole, before batches are cut from it."""
    import pyarrow.parquet as pq
    import torch

    from distributed_mtml.data.prepare import TaskPrep
    from distributed_mtml.data.stream import StreamedBatches, split_dataset
    from distributed_mtml.data.tasks import load_suite_spec

    task = load_suite_spec(seed_suite).tasks[1]
    path = os.path.join(seed_suite, task.path)
    pq.write_table(pq.read_table(path), path, row_group_size=50)
    features = [f"x{i}" for i in range(10)]
    dataset = split_dataset(seed_suite, task, features)
    blocks = [ray_session.get(ref) for bundle in dataset.iter_internal_ref_bundles() for ref in bundle.block_refs]
    assert {c.num_chunks for b in blocks for c in b.columns} == {1} and sum(b.num_rows for b in blocks) == 140
    shard = dataset.iterator()
    reader = lambda: StreamedBatches(shard, task, features, TaskPrep(), 16, 0, 1, 140, 50, torch.device("cpu"))  # noqa: E731
    first = reader()
    epochs = [torch.cat([y for _, y in first.epoch(e, 5)]) for e in range(3)]  # 15 batches; a pass has 8
    restarted = reader()
    assert torch.equal(torch.cat([y for _, y in restarted.epoch(1, 5)]), epochs[1])
    assert torch.equal(torch.cat([y for _, y in restarted.epoch(2, 5)]), epochs[2])
    passes = torch.cat(epochs)
    assert len(set(passes[:128].tolist())) == 128  # pass 0 spans epochs 0 and 1: no row twice
    assert not torch.equal(passes[:112], passes[128:240])  # pass 1 is another order
    for r in (first, restarted):  # mid-pass iterators: closed while Ray is up, not at the interpreter's exit
        r.batches.close()


def test_local_mode_trains_as_one_worker_does_and_resumes(ray_session, tmp_path, seed_suite, capsys):
    """`scaling.num_workers: 0` runs the training function in this process (Ray Train's local
    mode): every epoch's validation metrics equal a 1-worker Ray Train run's of the same seed,
    and its own checkpoints resume it where it stopped, again to the same numbers."""
    tracker, client = _tracker(tmp_path), _tracker(tmp_path).client()
    one = run_training(_config(tmp_path, seed_suite, scaling={"num_workers": 1}), "one", tracker)
    local = _config(tmp_path, seed_suite, scaling={"num_workers": 0}, training={"epochs": 2})
    first = run_training(local, "local", tracker)
    client.set_terminated(first.run_id, status="KILLED")  # as if interrupted after epoch 2
    capsys.readouterr()
    again = run_training(local.model_copy(update={"training": local.training.model_copy(update={"epochs": 3})}),
                         "local", tracker, resume=True)
    assert again.run_id == first.run_id and "after epoch 2 (checkpoint" in capsys.readouterr().out
    for key in ("val/mean_loss", "val/classify/auc", "val/regress/r2", "train/regress/loss"):
        ref = {m.step: m.value for m in client.get_metric_history(one.run_id, key)}
        got = {m.step: m.value for m in client.get_metric_history(first.run_id, key)}
        assert sorted(got) == [0, 1, 2] and got == pytest.approx(ref, rel=1e-6), key
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mtml.best_epoch"] == client.get_run(one.run_id).data.tags["mtml.best_epoch"]
    assert {"MLmodel", "artifacts"} <= logged_model_files(tracker.uri, first.run_id)


def test_writes_after_training_are_retried_and_one_that_keeps_failing_costs_no_finished_run(
        ray_session, tmp_path, seed_suite, monkeypatch, capsys):
    """Two runs inserting one dataset at once made one run FAILED with no model after all its
    epochs. Here the model is logged first; the datasets' write, failing twice, is tried again
    and logged; the figures, failing every time, are a warning and the tag mtml.unlogged."""
    from distributed_mtml import report
    from distributed_mtml.runtime import mlflow_run

    monkeypatch.setattr(mlflow_run, "RETRY_PAUSE_S", 0.0)
    failures = {"datasets": 2}
    real_log_datasets = Tracker.log_datasets

    def flaky_datasets(self, *args, **kwargs):
        if failures["datasets"]:
            failures["datasets"] -= 1
            raise RuntimeError('duplicate key value violates unique constraint "dataset_pk"')
        return real_log_datasets(self, *args, **kwargs)

    def broken_figures(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Tracker, "log_datasets", flaky_datasets)
    monkeypatch.setattr(report, "learning_curves", broken_figures)
    config = _config(tmp_path, seed_suite, scaling={"num_workers": 0}, training={"epochs": 2})  # local: logging is the point
    out = run_training(config, "writes", _tracker(tmp_path))
    run = _tracker(tmp_path).client().get_run(out.run_id)
    printed = capsys.readouterr().out
    assert run.info.status == "FINISHED" and run.data.tags[mlflow_run.UNLOGGED] == "the figures"
    assert {"MLmodel", "artifacts"} <= logged_model_files(_tracker(tmp_path).uri, out.run_id)
    assert failures["datasets"] == 0 and {d.dataset.name for d in run.inputs.dataset_inputs} == {"classify", "regress"}
    assert printed.count("logging the config, suite and datasets failed (duplicate key value") == 2
    assert "warning: could not log the figures (No space left on device)" in printed
    assert "test/regress/mse" in run.data.metrics
