"""Many tasks: what `mtml train` costs as the same kind of rows come split into more tasks.

    python jobs/bench_many_tasks.py [--tasks 10 100 1000] [--rows 40] [--epochs 30] [--modes local workers]

For each task count T: a multilevel suite of T groups x `rows` rows (4 row-level features, one
regression task a group), as a user has it: one table with a group column (`group_column`); and
beside it one task holding all the same rows (the same table without the group column). Each is trained by a
fresh `mtml train` process, timed from start to exit, in local mode (`scaling.num_workers: 0`) and
on 2 workers (the one task on 1), with the defaults otherwise. Printed side by side: wall seconds, the ratio to the
one task of the same rows, how many metric keys the MLflow run holds, the process tree's peak
resident memory, and statsmodels MixedLM's fit and predict on the same train rows (the anchor a
statistician would use; `pip install -e '.[bench]'`).
Targets: 1,000 tasks within 2x of one task of the same rows and at most 30 s in local mode;
10,000 tasks at most 5 minutes on 2 workers; at most 100 metric keys in any run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

from distributed_mtml.data.generators import make_suite
from distributed_mtml.report import table

WORK = tempfile.mkdtemp(prefix="mtml_bench_many_")
URI = f"sqlite:///{WORK}/mlflow.db"
MODES = {"local": {"num_workers": 0}, "workers": {"num_workers": 2}}


def _peak_mb(pid: int, stop: threading.Event, out: list[float]) -> None:
    """The largest resident memory of `pid` and its descendants together, polled every 0.2 s."""
    peak = 0.0
    while not stop.is_set():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            peak = max(peak, total / 2**20)
        except psutil.Error:
            pass
        stop.wait(0.2)
    out.append(peak)


def _train(name: str, suite: str, epochs: int, scaling: dict) -> tuple[float, float, int]:
    """(wall seconds, peak MB, metric keys of its MLflow run) of one `mtml train` process."""
    config = {"suite": {"path": suite}, "training": {"epochs": epochs}, "scaling": scaling,
              "checkpoint": {"dir": os.path.join(WORK, "runs")}, "tracking": {"experiment": "bench-many"}}
    path = os.path.join(WORK, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    begin, stop, peak = time.perf_counter(), threading.Event(), []
    proc = subprocess.Popen([sys.executable, "-m", "distributed_mtml", "train", "--config", path, "--tracking-uri", URI],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=_peak_mb, args=(proc.pid, stop, peak), daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - begin
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}")
    return wall, peak[0], _metric_keys(name)


def _metric_keys(config_name: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(URI)
    exp = client.get_experiment_by_name("bench-many")
    run = client.search_runs([exp.experiment_id], f"tags.`mtml.config_name` = '{config_name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return len(run.data.metrics)


def _one_task(suite: str, out: str) -> str:
    """A suite of one task holding every group's rows: the same table, its group column unused."""
    os.makedirs(out)
    with open(os.path.join(out, "suite.yaml"), "w") as f:
        yaml.safe_dump({"name": "one", "tasks": [{"name": "all", "type": "regression", "target": "y",
                                                  "path": os.path.join(suite, "schools.parquet")}]}, f)
    return out


def _mixedlm_seconds(suite: str) -> float:
    """statsmodels MixedLM (random intercept and slope on x1) fitted on the train rows and
    predicting the test rows with the groups' BLUPs: its wall seconds."""
    import pandas as pd
    import statsmodels.formula.api as smf

    data = pd.read_parquet(os.path.join(suite, "schools.parquet"))
    train, test = data[data.split == "train"], data[data.split == "test"]
    begin = time.perf_counter()
    fit = smf.mixedlm("y ~ x1 + x2 + x3 + x4 + z1 + z2", train, groups=train["school"], re_formula="~x1").fit()
    effects = fit.random_effects
    fixed = fit.predict(test)
    _ = fixed + [effects[g].iloc[0] + effects[g].iloc[1] * x for g, x in zip(test["school"], test["x1"])]
    return time.perf_counter() - begin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--no-mixedlm", action="store_true", help="skip the MixedLM anchor (statsmodels)")
    a = p.parse_args()
    print(f"bench_many_tasks: {os.cpu_count()} CPUs; {a.rows} rows per task, {a.epochs} epochs; work dir {WORK}",
          flush=True)
    rows = []
    for count in a.tasks:
        suite = os.path.join(WORK, f"tasks-{count}")
        make_suite("multilevel", suite, {"groups": count, "rows": a.rows, "features": 4, "seed": 0,
                                               "one_table": True})
        one = _one_task(suite, os.path.join(WORK, f"one-{count}"))
        mixed = float("nan") if a.no_mixedlm else _mixedlm_seconds(suite)
        for mode in a.modes:
            alone = {**MODES[mode], "num_workers": min(MODES[mode]["num_workers"], 1)}  # one task: one worker at most
            base, base_peak, base_keys = _train(f"one-{count}-{mode}", one, a.epochs, alone)
            wall, peak, keys = _train(f"tasks-{count}-{mode}", suite, a.epochs, MODES[mode])
            print(f"[bench] {count} tasks, {mode}: {wall:.1f} s (one task of the same rows {base:.1f} s), {keys} keys",
                  flush=True)
            rows.append([f"1 x {count * a.rows}", mode, f"{base:.1f}", "1.00x", base_keys, f"{base_peak:.0f}", ""])
            rows.append([f"{count} x {a.rows}", mode, f"{wall:.1f}", f"{wall / base:.2f}x", keys, f"{peak:.0f}",
                         f"{mixed:.1f}"])
    print()
    print(table(["suite (tasks x rows)", "mode", "wall s", "x one task", "metric keys", "peak MB", "MixedLM s"], rows))


if __name__ == "__main__":
    main()
