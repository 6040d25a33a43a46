"""Small jobs: wall time of `mtml train` on a 200-row, 3-task suite, as a user runs it.

    python jobs/bench_small.py [--epochs 60]

Three ways of running the same config (mmoe, 3 tasks x 200 rows, article's trunk), each a
fresh `mtml train` process timed from start to exit, side by side in one run:
  every epoch   2 workers reporting and checkpointing every epoch (`training.report_every_s: 0`,
                `checkpoint.every_n_epochs: 1`): how every run went before the report cadence
  2 workers     the defaults: a report when 10 s have passed, and at the end
  local mode    `scaling.num_workers: 0`: the training function in the command's own process
The kept epoch and its validation loss are printed beside each: they must agree. Then a
training search over the same job (`mtml tune` with a `search:` section): 16 local-mode trials
of learning rate x aggregation method under ASHA, and one repeat of the best. The anchor, last:
scikit-learn in a fresh process of its own (imports included), a standardised MLP of the
article's trunk widths (100, 50) per task for the same 60 epochs, fitted on train and scored on
val (its mean val MSE in the targets' own units, which `val/mean_loss` is not: it is on
standardised targets).
Targets: local mode at most 6 s, 2 workers at most 25 s, the 16-trial search at most
3 minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import yaml

from distributed_mtml.data.generators import make_suite
from distributed_mtml.report import table

WORK = tempfile.mkdtemp(prefix="mtml_bench_small_")
URI = f"sqlite:///{WORK}/mlflow.db"
MODES = {
    "every epoch": ({"num_workers": 2}, {"report_every_s": 0}, {"every_n_epochs": 1}),
    "2 workers": ({"num_workers": 2}, {}, {}),
    "local mode": ({"num_workers": 0}, {}, {}),
}


def _run(name: str, suite: str, epochs: int, scaling: dict, training: dict, checkpoint: dict) -> tuple[float, str, str]:
    """(wall seconds, kept epoch, its val/mean_loss) of one `mtml train` process."""
    config = {"suite": {"path": suite}, "training": {"epochs": epochs, "batch_size": 32, "lr": 0.003, **training},
              "scaling": scaling, "checkpoint": {"dir": os.path.join(WORK, "runs"), **checkpoint},
              "tracking": {"experiment": "bench-small"}}
    path = os.path.join(WORK, f"{name.replace(' ', '-')}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "distributed_mtml", "train", "--config", path, "--tracking-uri", URI],
                          capture_output=True, text=True)
    wall = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return wall, *_kept(path)


def _kept(config_path: str) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(URI)
    exp = client.get_experiment_by_name("bench-small")
    name = os.path.splitext(os.path.basename(config_path))[0]
    run = client.search_runs([exp.experiment_id], f"tags.`mtml.config_name` = '{name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return run.data.tags["mtml.best_epoch"], f"{run.data.metrics['best/val/mean_loss']:.6f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    a = p.parse_args()
    suite = os.path.join(WORK, "mmoe")
    make_suite("mmoe", suite, {"rows": 200, "tasks": 3, "features": 8, "seed": 0})
    print(f"bench_small: {os.cpu_count()} CPUs; 3 mmoe tasks x 200 rows, {a.epochs} epochs; work dir {WORK}", flush=True)
    rows, base = [], None
    for name, sections in MODES.items():
        wall, epoch, loss = _run(name, suite, a.epochs, *sections)
        base = base or wall
        rows.append([name, f"{wall:.1f}", f"{wall / base:.2f}x", epoch, loss])
        print(f"[bench] {name}: {wall:.1f} s", flush=True)
    wall = _search(suite, a.epochs)
    rows.append(["16-trial search", f"{wall:.1f}", f"{wall / base:.2f}x", "", ""])
    print(f"[bench] 16-trial search: {wall:.1f} s", flush=True)
    wall, mse = _scikit_learn(suite, a.epochs)
    rows.append(["scikit-learn MLP per task", f"{wall:.1f}", f"{wall / base:.2f}x", "", f"(val MSE {mse:.4f})"])
    print(f"[bench] scikit-learn: {wall:.1f} s", flush=True)
    print()
    print(table(["mode", "wall s", "x every epoch", "kept epoch", "its val/mean_loss"], rows))


ANCHOR = """
import glob, os, sys, warnings
import numpy as np, pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
warnings.filterwarnings("ignore", category=ConvergenceWarning)
errors = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.parquet"))):
    d = pd.read_parquet(path)
    x, y = d.drop(columns=["y", "split"]).to_numpy(), d["y"].to_numpy()
    train, val = (d["split"] == "train").to_numpy(), (d["split"] == "val").to_numpy()
    model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(100, 50), batch_size=32, learning_rate_init=0.003,
                                                         max_iter=int(sys.argv[2]), random_state=0))
    model.fit(x[train], y[train])
    errors.append(float(np.mean((model.predict(x[val]) - y[val]) ** 2)))
print(np.mean(errors))
"""


def _scikit_learn(suite: str, epochs: int) -> tuple[float, float]:
    """(wall seconds, mean val MSE) of the anchor (see the module's docstring), its own process."""
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ANCHOR, suite, str(epochs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the scikit-learn anchor failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - begin, float(done.stdout.strip().splitlines()[-1])


def _search(suite: str, epochs: int) -> float:
    """Wall seconds of `mtml tune` over the local-mode job: 16 settings, ASHA, one repeat."""
    config = {"suite": {"path": suite}, "training": {"epochs": epochs, "batch_size": 32, "lr": 0.003},
              "scaling": {"num_workers": 0}, "checkpoint": {"dir": os.path.join(WORK, "runs")},
              "tracking": {"experiment": "bench-small"},
              "search": {"space": {"training.lr": {"loguniform": [3e-4, 1e-2]},
                                   "aggregation.method": {"choice": ["mean", "pcgrad", "mgda"]}}},
              "tune": {"num_samples": 16, "repeats": 1, "grace_period": 10, "cpus_per_trial": 0.5}}
    path = os.path.join(WORK, "search.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "distributed_mtml", "tune", "--config", path, "--tracking-uri", URI],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the search failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - begin


if __name__ == "__main__":
    main()
