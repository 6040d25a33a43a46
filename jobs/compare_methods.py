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

Usage: python jobs/compare_methods.py [--seeds 3] [--epochs 4] [--correlations 0.9 0.5 0 -0.5]
       [--methods mean pcgrad mgda] [--representation] [--workers 0]
"""

from __future__ import annotations

import argparse
import os

import benchlib

from distributed_mtml.aggregation import METHODS
from distributed_mtml.data.generators import make_suite
from distributed_mtml.report import table
from distributed_mtml.stats import fmt

REPRESENTATION = " (repr.)"  # a Gram method with aggregation.gradients: representation


def _val_loss(suite_dir: str, method: str, seed: int, epochs: int, steps: int, workers: int) -> float:
    name, gradients = (method[: -len(REPRESENTATION)], "representation") if method.endswith(REPRESENTATION) \
        else (method, "parameters")
    cfg = benchlib.config(
        suite={"path": suite_dir},
        model={"trunk": {"widths": [64, 32]}},
        training={"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps, "lr": 0.003, "seed": seed},
        scaling={"num_workers": workers},
        aggregation={"method": name, "gradients": gradients},
    )
    return benchlib.train(cfg, f"compare-{name}-{gradients}").metrics["val/mean_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--correlations", type=float, nargs="*", default=[0.9, 0.5, 0.0, -0.5])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2,
                        help="0: local mode, the same updates (the exchange reproduces one process) in a fraction of the time")
    parser.add_argument("--representation", action="store_true",
                        help="each Gram method also with aggregation.gradients: representation, beside parameters")
    args = parser.parse_args()
    methods = ["mean", *[m for m in args.methods if m != "mean"]]
    if args.representation:
        methods += [m + REPRESENTATION for m in methods if METHODS[m].kind == "gram" and METHODS[m].needs_exchange]
    rows = []
    for p in args.correlations:
        losses: dict[str, list[float]] = {m: [] for m in methods}
        for seed in range(args.seeds):
            suite = os.path.join(benchlib.WORKDIR, f"mmoe-{p}-{seed}")
            make_suite("mmoe", suite, {"tasks": 2, "correlation": p, "features": 16, "sines": 2,
                                       "rows": 1256, "train_rows": 256, "seed": seed})
            for method in methods:
                losses[method].append(_val_loss(suite, method, seed, args.epochs, args.steps, args.workers))
                print(f"[compare] p={p} seed {seed} {method}: val loss {losses[method][-1]:.4f}", flush=True)
        for method in methods:
            diff = [a - b for a, b in zip(losses[method], losses["mean"])]
            wins = sum(d < 0 for d in diff)
            rows.append([p, method, fmt(losses[method]), "" if method == "mean" else fmt(diff),
                         "" if method == "mean" else f"{wins}/{len(diff)}"])
    print()
    print(table(["correlation", "method", "val loss (mean +- 95% CI)", "minus mean's (paired)", "seeds better"], rows))


if __name__ == "__main__":
    main()
