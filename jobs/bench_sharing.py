"""Does the shared trunk help where it should? Multi-task against single-task training.

For each suite below and several seeds, trains
  shared      one `mtml train` run over all tasks (2 workers, one shared trunk), and
  single      one run per task alone (same model, epochs, steps per epoch, batch size, lr),
then prints each task's test metrics side by side (mean +- std over seeds). Every task gets
the same number of gradient steps on the same batch size in both settings: the budget is equal.

Suites: seed-example (the article's pair) at a small training size, where the second task's
data should stand in for missing data of the first, and mmoe with task correlation 0.9.

Usage: python jobs/bench_sharing.py [--seeds 4] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics

import benchlib

from distributed_mtml.data.generators import make_suite
from distributed_mtml.report import table

# name -> (generator, options, steps per epoch). Small train splits, large test splits.
SUITES = {
    "seed-example, 32 train rows/task": ("seed-example", {"rows": 1032, "train_rows": 32}, 30),
    "mmoe p=0.9, 64 train rows/task": (
        "mmoe", {"tasks": 2, "correlation": 0.9, "features": 16, "sines": 2, "rows": 1064, "train_rows": 64}, 24),
}
HEADLINE = {"classification": ("accuracy", True), "regression": ("mse", False)}  # metric, higher is better


def _train(suite_dir: str, workers: int, seed: int, epochs: int, steps: int, name: str) -> dict[str, float]:
    cfg = benchlib.config(
        suite={"path": suite_dir},
        training={"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps, "lr": 0.003, "seed": seed},
        scaling={"num_workers": workers},
    )
    return benchlib.test_metrics(benchlib.train(cfg, name), suite_dir)


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} +- {statistics.pstdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for label, (generator, options, steps) in SUITES.items():
        shared: dict[str, list[float]] = {}
        single: dict[str, list[float]] = {}
        kinds: dict[str, str] = {}
        for seed in range(args.seeds):
            suite = os.path.join(benchlib.WORKDIR, f"{generator}-{seed}")
            spec = make_suite(generator, suite, {**options, "seed": seed})
            together = _train(suite, 2, seed, args.epochs, steps, f"shared-{generator}")
            for task in spec.tasks:
                kinds[task.name] = task.type
                metric = f"test/{task.name}/{HEADLINE[task.type][0]}"
                alone = _train(
                    benchlib.single_task_suite(suite, task.name), 1, seed, args.epochs, steps, f"single-{generator}"
                )
                shared.setdefault(task.name, []).append(together[metric])
                single.setdefault(task.name, []).append(alone[metric])
                print(f"[bench] {label} seed {seed} {metric}: single {alone[metric]:.4f} shared {together[metric]:.4f}", flush=True)
        for task, kind in kinds.items():
            metric, higher = HEADLINE[kind]
            gain = statistics.mean(shared[task]) - statistics.mean(single[task])
            wins = sum((s > a) == higher and s != a for s, a in zip(shared[task], single[task]))
            rows.append([label, task, f"test {metric}", _fmt(single[task]), _fmt(shared[task]),
                         "shared" if (gain > 0) == higher else "single", f"{wins}/{len(shared[task])}"])
    print()
    print(table(["suite", "task", "metric", "single-task", "shared trunk", "better", "seeds shared wins"], rows))


if __name__ == "__main__":
    main()
