"""Cost of conflict-aware aggregation across 2 workers, against plain DDP averaging (`mean`).

For the article's model and the medium 4 x 1024 trunk, each method trains the seed-example
suite (one task per worker) through `mtml train`; printed side by side from this one run:
step time relative to `mean` (from the best epoch's samples/s) and the bytes each rank
receives per step for the trunk gradients:
  mean     DDP ring all-reduce of P floats: 2 (W-1)/W * 4P bytes
  others   all-gather of every rank's task gradients: (W-1) * tasks_per_rank * 4P bytes
Target: at most 1.5x mean's step time on the medium trunk.

Usage: python jobs/bench_aggregation.py [--epochs 3] [--steps 200]
"""

from __future__ import annotations

import argparse

import benchlib

from distributed_mtml.aggregation import METHODS
from distributed_mtml.models import TaskShape, build_trunk
from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.report import table

MODELS = {"article 10-100-50": ([100, 50], 1.0), "medium 4x1024": ([1024] * 4, 0.1)}
WORKERS, BATCH = 2, 64


def _bytes_per_step(method: str, widths: list[int]) -> float:
    trunk = build_trunk(ModelConfig(trunk=TrunkConfig(widths=widths)), [TaskShape("t", "regression", 10)])
    p = sum(x.numel() for x in trunk.parameters())
    if not METHODS[method].needs_exchange:
        return 2 * (WORKERS - 1) / WORKERS * 4 * p
    return (WORKERS - 1) * 1 * 4 * p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch for the article's model")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    rows = []
    for model, (widths, scale) in MODELS.items():
        steps = max(int(args.steps * scale), 10)
        step_ms = {}
        for method in ["mean", *[m for m in args.methods if m != "mean"]]:
            cfg = benchlib.config(
                suite={"generator": "seed-example", "options": {"rows": 4000}},
                model={"trunk": {"widths": widths}},
                training={"epochs": args.epochs, "batch_size": BATCH, "steps_per_epoch": steps},
                scaling={"num_workers": WORKERS},
                aggregation={"method": method},
            )
            out = benchlib.train(cfg, f"cost-{method}")
            step_ms[method] = 1000 * WORKERS * BATCH / benchlib.best_throughput(out)
            rows.append([model, method, step_ms[method], step_ms[method] / step_ms["mean"],
                         _bytes_per_step(method, widths) / 1e6, out.metrics["val/mean_loss"]])
    print()
    print(table(["model", "method", "ms/step", "x mean", "MB received/rank/step", "final val loss"], rows))


if __name__ == "__main__":
    main()
