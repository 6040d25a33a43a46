"""Does conflict-aware aggregation beat equal weighting? Every method against `mean`.

For mmoe suites of two regression tasks at pairwise correlations 0.9, 0.5, 0 and -0.5 (the
last one: the tasks' weight vectors point apart), and several seeds, trains each method
through `mtml train` (2 workers by default, one task each; same model, budget and seed for every
method) and prints the final validation loss, averaged over tasks, as mean +- 95% CI over
seeds (Student t), with the paired difference to `mean` (negative: the method is better)
and on how many seeds the method beat `mean`.

Published comparisons often find equal weighting as good as these methods: read the CI
before reading a ranking.

`--representation` adds each Gram method with `aggregation.gradients: representation`
(labelled "(repr.)"), to compare it with the same method on parameter gradients.

`--architectures hard mmoe cgc ple cross_stitch` trains every method under each architecture
(`model.architecture`, default options: 4 shared experts, 1 own); the paired differences are
then to `hard` with `mean`, and the test loss (of the model kept by val) stands beside the val
loss. MMoE's article expects its advantage over a shared bottom to grow as correlation falls.

`--generator multilevel` trains on multilevel suites instead (12 groups of 40 rows, one
regression task a group: a random intercept and slopes per group, as a mixed model assumes);
the correlation column then reads "multilevel".

Usage: python jobs/compare_methods.py [--seeds 3] [--epochs 4] [--correlations 0.9 0.5 0 -0.5]
       [--methods mean pcgrad mgda] [--representation] [--workers 0] [--architectures hard mmoe]
       [--generator mmoe|multilevel]
"""

from __future__ import annotations

import argparse
import os

import benchlib

from distributed_mtml.aggregation import METHODS
from distributed_mtml.architectures import ARCHITECTURES
from distributed_mtml.data.generators import make_suite
from distributed_mtml.report import table
from distributed_mtml.search.summary import test_value
from distributed_mtml.stats import fmt

REPRESENTATION = " (repr.)"  # a Gram method with aggregation.gradients: representation


def _losses(suite_dir: str, method: str, seed: int, epochs: int, steps: int, workers: int,
            architecture: str = "hard") -> tuple[float, float]:
    """(val loss of the kept model, averaged over tasks, as training logged it; its test loss)."""
    name, gradients = (method[: -len(REPRESENTATION)], "representation") if method.endswith(REPRESENTATION) \
        else (method, "parameters")
    cfg = benchlib.config(
        suite={"path": suite_dir},
        model={"trunk": {"widths": [64, 32]}, "architecture": architecture},
        training={"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps, "lr": 0.003, "seed": seed},
        scaling={"num_workers": workers},
        aggregation={"method": name, "gradients": gradients},
    )
    metrics = benchlib.train(cfg, f"compare-{architecture}-{name}-{gradients}").metrics
    return metrics["val/mean_loss"], test_value(metrics, "val/mean_loss")  # many tasks: their logged mean


def _suite(generator: str, correlation: float | str, seed: int) -> str:
    """A suite of the comparison: two mmoe tasks at `correlation`, or a multilevel table's groups."""
    suite = os.path.join(benchlib.WORKDIR, f"{generator}-{correlation}-{seed}")
    if generator == "mmoe":
        make_suite("mmoe", suite, {"tasks": 2, "correlation": correlation, "features": 16, "sines": 2,
                                   "rows": 1256, "train_rows": 256, "seed": seed})
    else:
        make_suite("multilevel", suite, {"groups": 12, "rows": 40, "features": 4, "seed": seed, "one_table": True})
    return suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--correlations", type=float, nargs="*", default=[0.9, 0.5, 0.0, -0.5])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2,
                        help="0: local mode, the same updates (the exchange reproduces one process) in a fraction of the time")
    parser.add_argument("--architectures", nargs="*", default=["hard"], choices=list(ARCHITECTURES))
    parser.add_argument("--generator", choices=["mmoe", "multilevel"], default="mmoe",
                        help="multilevel: groups of one table, no correlation sweep")
    parser.add_argument("--representation", action="store_true",
                        help="each Gram method also with aggregation.gradients: representation, beside parameters")
    args = parser.parse_args()
    methods = ["mean", *[m for m in args.methods if m != "mean"]]
    if args.representation:
        methods += [m + REPRESENTATION for m in methods if METHODS[m].kind == "gram" and METHODS[m].needs_exchange]
    several = len(args.architectures) > 1
    runs = [(a, m) for a in args.architectures for m in methods]
    label = {run: f"{run[0]} {run[1]}" if several else run[1] for run in runs}
    anchor = ("hard" if "hard" in args.architectures else args.architectures[0], "mean")
    rows = []
    for p in (args.correlations if args.generator == "mmoe" else ["multilevel"]):
        losses: dict[tuple, list[tuple[float, float]]] = {run: [] for run in runs}
        for seed in range(args.seeds):
            suite = _suite(args.generator, p, seed)
            for run in runs:
                losses[run].append(_losses(suite, run[1], seed, args.epochs, args.steps, args.workers, run[0]))
                print(f"[compare] p={p} seed {seed} {label[run]}: val loss {losses[run][-1][0]:.4f}, "
                      f"test {losses[run][-1][1]:.4f}", flush=True)
        for run in runs:
            val, test = ([v[k] for v in losses[run]] for k in (0, 1))
            diff = [a[0] - b[0] for a, b in zip(losses[run], losses[anchor])]
            test_diff = [a[1] - b[1] for a, b in zip(losses[run], losses[anchor])]
            same = run == anchor
            rows.append([p, label[run], fmt(val), "" if same else fmt(diff), "" if same else f"{sum(d < 0 for d in diff)}/{len(diff)}",
                         fmt(test), "" if same else fmt(test_diff)])
    print()
    print(table(["correlation", "method", "val loss (mean +- 95% CI)", f"minus {label[anchor]}'s (paired)", "seeds better",
                 "test loss", "test minus (paired)"], rows))


if __name__ == "__main__":
    main()
