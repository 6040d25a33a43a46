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


def test_ctrl_c_ends_a_training_search_killed_and_resume_finishes_it_without_the_trials_done(tmp_path, seed_suite):
    """Three settings one after another (`mtml tune` with a `search:` section); Ctrl-C once the
    first has finished: the parent and the running trial's run end KILLED. `--resume` continues
    the same parent through Tune's restore: the finished trial is not trained again, the others
    are, and the repeat follows. (Transfer's `mtml tune` ends on Ctrl-C by the same code.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = {"suite": {"path": seed_suite}, "training": {"epochs": 40}, "scaling": {"num_workers": 0},
           "search": {"space": {"training.lr": {"grid": [0.001, 0.002, 0.003]}}},
           "tune": {"num_samples": 1, "repeats": 1, "cpus_per_trial": 2},  # one at a time on 2 CPUs
           "checkpoint": {"dir": str(tmp_path / "runs")}}
    argv = ["tune", "--config", _write(tmp_path, raw), "--tracking-uri", uri]
    code, out, took = _interrupt_when(argv, tmp_path, "[tune] search trials 1/3", settle_s=3)
    assert code == 130, out[-3000:]
    assert took < 20, f"{took:.1f} s from Ctrl-C to exit"
    parent = _only_run(uri, "tags.`mtml.search` = 'training'")
    assert parent.info.status == "KILLED"
    client = MlflowClient(uri)

    def children():
        return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    before = {r.info.run_name.split("-search-")[1].rsplit("-", 1)[0]: r.info.status for r in children()}
    done = [trial for trial, status in before.items() if status == "FINISHED"]
    assert len(done) == 1 and "KILLED" in before.values(), before
    resumed = subprocess.run([sys.executable, "-m", "distributed_mtml", *argv, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"[tune] resuming search {parent.info.run_id}" in resumed.stdout
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    finished = [r for r in children() if r.info.status == "FINISHED"]
    trials = [r.info.run_name.split("-search-")[1].rsplit("-", 1)[0] for r in finished if r.data.tags["mtml.stage"] == "search"]
    assert sorted(set(trials)) == sorted(trials) and len(trials) == 3 and trials.count(done[0]) == 1, (before, trials)
    assert [r.data.tags["mtml.stage"] for r in finished].count("repeat") == 1



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
