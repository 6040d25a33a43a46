"""Ctrl-C as a terminal sends it: SIGINT to the whole process group of a real `mtml` command,
once its work is under way. The run must end KILLED within seconds, say how to resume, and
exit 130; checkpoints stay for --resume."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def _interrupt_when(argv: list[str], cwd, started: str, settle_s: float = 0.0) -> tuple[int, str, float]:
    """Runs `mtml <argv>` in its own process group, sends SIGINT to the group once `started`
    appears in its output (and `settle_s` more), and returns (exit code, output, seconds from
    the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "distributed_mtml", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not any(started in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    time.sleep(settle_s)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hangs before failing
        stack = subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True, text=True).stdout
        os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
        raise AssertionError(f"no exit 60 s after SIGINT; its stack:\n{stack}\noutput:\n{''.join(lines)[-3000:]}") from None
    took = time.monotonic() - sent
    reader.join(timeout=10)
    return code, "".join(lines), took


def _only_run(uri: str, where: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("distributed-mtml")
    (run,) = client.search_runs([exp.experiment_id], where)
    return run


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_ctrl_c_ends_a_meta_training_run_killed_and_resumable(tmp_path):
    """(`mtml train`'s Ctrl-C is the README tour's step, in tests/test_tour.py.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = {"suite": {"generator": "sinusoid"}, "meta": {"iterations": 100000, "report_every": 20, "shots": 5,
                                                        "meta_batch_size": 4, "val_tasks": 10},
           "scaling": {"num_workers": 2}, "checkpoint": {"dir": str(tmp_path / "runs")}}
    code, out, took = _interrupt_when(["meta-train", "--config", _write(tmp_path, raw), "--tracking-uri", uri],
                                      tmp_path, "[mtml] iteration 40/")
    assert code == 130, out[-3000:]
    assert took < 20, f"{took:.1f} s from Ctrl-C to exit"
    run = _only_run(uri, "tags.`mtml.config_name` = 'config'")
    assert run.info.status == "KILLED"
    assert f"interrupted: run {run.info.run_id} is marked KILLED; continue it with --resume" in out
    assert list((tmp_path / "runs").glob("config-*/checkpoint_*")), "no checkpoint left to resume from"


def test_ctrl_c_ends_a_tune_search_killed(ray_session, tmp_path, seed_suite):
    from distributed_mtml.config import validate_config
    from distributed_mtml.tracking import Tracker
    from distributed_mtml.train.launch import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    source = run_training(validate_config({"suite": {"path": seed_suite}, "training": {"epochs": 1},
                                           "scaling": {"num_workers": 1}, "checkpoint": {"dir": str(tmp_path / "src")}}),
                          "source", Tracker(uri))
    raw = {"transfer": {"source": source.checkpoint_path, "target": {"path": seed_suite}, "target_task": "regress",
                        "shots": 10, "steps": 100000, "eval_every": 10, "strategies": ["scratch", "finetune"]},
           "tune": {"num_samples": 2, "repeats": 2}, "checkpoint": {"dir": str(tmp_path / "runs")}}
    code, out, took = _interrupt_when(["tune", "--config", _write(tmp_path, raw), "--tracking-uri", uri],
                                      tmp_path, "[tune] search", settle_s=15)  # trials up: 8 s was short in a full run
    assert code == 130, out[-3000:]
    assert took < 20, f"{took:.1f} s from Ctrl-C to exit"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("distributed-mtml-transfer")
    runs = client.search_runs([exp.experiment_id], "tags.`mtml.command` = 'tune'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.status for p in parents] == ["KILLED"] and children, out[-3000:]
    assert all(c.info.status in ("KILLED", "FINISHED") for c in children)


def test_an_interrupt_waits_for_the_tracking_write_in_progress():
    """Ctrl-C during an MLflow write is delivered when the write is done: cut halfway, an
    SQLite transaction would keep the write lock that the KILLED status then waits on."""
    from distributed_mtml.interrupts import interrupt_on_signals, restore, uninterrupted

    previous = interrupt_on_signals()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the handler has run by now, and deferred
                done.append("write finished")
        assert done == ["write finished"]
        with pytest.raises(KeyboardInterrupt):  # outside a write: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        restore(previous)


class _InterruptedFinalizer:
    """Ctrl-C landing while the garbage collector runs a finalizer (SQLAlchemy's weakref
    callbacks did, in CI): Python prints the KeyboardInterrupt as "Exception ignored"."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs here, inside the finalizer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost interrupt, printed
def test_a_ctrl_c_lost_in_a_finalizer_still_ends_the_run_killed(tmp_path):
    from distributed_mtml.interrupts import interrupt_on_signals, restore
    from distributed_mtml.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = Tracker(uri).create_run("distributed-mtml", "config", {}, {})
    previous = interrupt_on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            with Tracker(uri).final_status(run_id):
                _InterruptedFinalizer()  # dropped at once: its __del__ runs and the interrupt is lost
                finished = True  # without the check, the block would end here as FINISHED
        assert finished
    finally:
        restore(previous)
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
