"""The README's five-minute tour, run as written, in order, in a fresh directory that holds only
the repository's shipped configs (as a fresh clone does): every step must work where it stands.

Shorter settings are appended to the long steps (later `--set`s win); `<RUN_ID>` is the run the
step before printed; the Ctrl-C step gets a real SIGINT to its process group after two epochs
(it stands for `mtml train`'s Ctrl-C test: `test_interrupts` has meta-train's and tune's);
`mlflow ui` (a server that runs until stopped) is the one step not run: the demo's output must
name that command for this directory. The demo step also checks what a new user sees first.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORTER = {  # appended to a step whose command starts so: same commands, less compute
    "mtml train --config jobs/configs/mmoe_pcgrad.yaml": ["--set", "training.epochs=1"],
    "mtml train --config jobs/configs/demo.yaml": ["--set", "training.epochs=4"],
    "mtml meta-train": ["--set", "meta.iterations=60", "--set", "meta.report_every=20", "--set", "meta.val_tasks=20"],
    "mtml evaluate --run <RUN_ID> --shots": ["--tasks", "50"],
    "mtml transfer": ["--set", "transfer.steps=20", "--set", "transfer.strategies=[scratch,finetune]"],
    "mtml tune": ["--set", "training.epochs=2", "--set", "tune.num_samples=2", "--set", "tune.repeats=1"],
}


def tour_steps() -> list[tuple[str, str]]:
    """(command, its comment) for every line of the README's tour block; continuation comment
    lines are joined to the step above."""
    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme.split("## Five-minute tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    steps: list[tuple[str, str]] = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        if command.strip():
            steps.append((command.strip(), comment.strip()))
        elif comment and steps:
            steps[-1] = (steps[-1][0], steps[-1][1] + " " + comment.strip())
    return steps


def _argv(command: str, run_id: str | None, shorten: bool) -> list[str]:
    if "<RUN_ID>" in command:
        assert run_id, f"'{command}': no run printed before it"
    words = shlex.split(command.replace("<RUN_ID>", run_id or ""))
    extra = next((v for k, v in SHORTER.items() if command.startswith(k)), []) if shorten else []
    return [sys.executable, "-m", "distributed_mtml", *words[1:], *extra]


def _run(argv: list[str], cwd: str, interrupt_after: str | None) -> tuple[int, str, float]:
    """The step's exit code, output and seconds from Ctrl-C to its exit; with `interrupt_after`,
    Ctrl-C once that line shows."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, sent = [], None
    for line in proc.stdout:
        out.append(line)
        if interrupt_after and interrupt_after in line:
            time.sleep(1)
            os.killpg(proc.pid, signal.SIGINT)
            interrupt_after, sent = None, time.monotonic()
    code = proc.wait(timeout=600)
    return code, "".join(out), time.monotonic() - sent if sent else 0.0


def _check_demo(out: str, tmp_path) -> None:
    """What a new user sees first: a line at once, progress, a table that beats the trivial
    predictor, no Ray noise, and a run named for its config that holds its best epoch."""
    assert out.startswith("[mtml] starting a local Ray ...") and "[mtml] epoch 8/8" in out
    assert "Token authentication is enabled" not in out and "PreemptionWatcher" not in out
    assert "(TrainController pid=" not in out
    table = out.split("its validation metrics:")[1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:5]}
    assert set(rows) == {"classify", "regress"} and all(row[-1] == "yes" for row in rows.values())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("distributed-mtml").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mtml.config_name"] == "demo"
    assert re.fullmatch(r"demo-[0-9a-f]{6}", run.info.run_name)  # distinct names, one config
    sections = {key.split(".")[0] for key in run.data.params}  # only what a train run reads
    assert {"training", "model", "aggregation", "plan"} <= sections and not sections & {"meta", "transfer", "tune"}
    assert run.data.metrics["val/classify/accuracy"] > 0.85 and run.data.metrics["val/regress/r2"] > 0.7
    assert abs(run.data.metrics["baseline/val/regress/r2"]) < 0.05
    history = client.get_metric_history(run.info.run_id, "val/mean_loss")
    best = min(history, key=lambda m: (m.value, m.step))  # the kept model is the best epoch
    assert run.data.tags["mtml.best_epoch"] == str(best.step) and f"the kept model is epoch {best.step + 1}'s" in out


def test_the_readme_tour_works_in_order_in_a_fresh_directory(tmp_path):
    os.makedirs(tmp_path / "jobs")
    os.symlink(os.path.join(REPO, "jobs", "configs"), tmp_path / "jobs" / "configs")
    steps = tour_steps()
    assert [c.split()[1] for c in (s[0] for s in steps) if c.startswith("mtml")] == [
        "demo", "data", "data", "data", "train", "train", "evaluate", "train", "affinity",
        "meta-train", "evaluate", "transfer", "tune"]  # the tour this test was written for
    run_id = None
    for command, comment in steps:
        if command.startswith("mlflow ui"):
            assert "mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db" == command.split("#")[0].strip()
            continue
        ctrl_c = "Ctrl-C" in comment
        # the Ctrl-C step as written: shortened to 4 epochs, it could finish before the signal lands
        code, out, took = _run(_argv(command, run_id, shorten=not ctrl_c), str(tmp_path),
                               "[mtml] epoch 2/" if ctrl_c else None)
        assert code == (130 if ctrl_c else 0), f"'{command}' exited {code}:\n{out[-3000:]}"
        if command == "mtml demo":
            assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
            _check_demo(out, tmp_path)
        if ctrl_c:  # ends KILLED within seconds, its checkpoints kept: the resume step below uses them
            assert took < 20, f"{took:.1f} s from Ctrl-C to exit"
            (killed,) = re.findall(r"interrupted: run ([0-9a-f]{32}) is marked KILLED; continue it with --resume", out)
            assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(killed).info.status == "KILLED"
        if "--resume" in command:
            assert f"[mtml] resuming run {run_id}" in out and "after epoch" in out  # the interrupted run
        found = re.findall(r"\brun ([0-9a-f]{32})\b", out)
        run_id = found[-1] if found else run_id
    assert "best by validation:" in out
