"""Cost of conflict-aware aggregation across 2 workers, against plain DDP averaging (`mean`).

For the article's model and the medium 4 x 1024 trunk, each method trains the seed-example
suite (one task per worker) through `mtml train`; printed side by side from this one run:
step time relative to `mean` (from the best epoch's samples/s) and the bytes each rank
receives per step for the trunk gradients:
  mean     DDP ring all-reduce of P floats: 2 (W-1)/W * 4P bytes
  others   all-gather of every rank's task gradients: (W-1) * tasks_per_rank * 4P bytes
Target: at most 1.5x mean's step time on the medium trunk.

`--many K` measures instead what grows with the task count: an mmoe suite of K tasks on 2
workers (the article's trunk, batch 64 per task), samples/s of `mean`, and of `mgda` and
`pcgrad` on parameter gradients (one trunk backward per task) and on representation
gradients (`aggregation.gradients: representation`, one per step), each as a ratio to `mean`.
Target: representation at least 0.5x mean at 128 tasks. With `--methods`, those methods
instead: the loss weightings (FAMO's target: at least 0.8x mean at 128 tasks), and each Gram
method on the gradients `--gradients` names.

Usage: python jobs/bench_aggregation.py [--epochs 3] [--steps 200] [--many 128 [--trunk 100,256]
       [--methods famo gls mgda] [--gradients parameters representation]]
"""

from __future__ import annotations

import argparse

import benchlib

from distributed_mtml.aggregation import METHODS
from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.models import TaskShape, build_trunk
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
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHODS))
    parser.add_argument("--gradients", nargs="*", default=["parameters", "representation"],
                        choices=["parameters", "representation"], help="--many: what the Gram methods compare")
    parser.add_argument("--many", type=int, default=0, help="K: the many-task comparison instead (see above)")
    parser.add_argument("--trunk", default="100,50", help="--many's trunk widths; representation needs the last above K")
    args = parser.parse_args()
    if args.many:
        return _many_tasks(args.many, args.epochs, args.steps, [int(w) for w in args.trunk.split(",")],
                           args.methods or ["mgda", "pcgrad"], args.gradients)
    rows = []
    for model, (widths, scale) in MODELS.items():
        steps = max(int(args.steps * scale), 10)
        step_ms = {}
        for method in ["mean", *[m for m in args.methods or METHODS if m != "mean"]]:
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


def _many_tasks(k: int, epochs: int, steps: int, widths: list[int], methods: list[str], kinds: list[str]) -> None:
    """mean, and each method at K tasks: a Gram method on each of `kinds` of gradients."""
    from distributed_mtml.data.generators import make_suite

    suite = f"{benchlib.WORKDIR}/mmoe-{k}"
    make_suite("mmoe", suite, {"tasks": k, "features": k + 8, "rows": 1000, "seed": 0})  # mmoe needs features > tasks
    rows, mean = [], None
    gram = {m for m, entry in METHODS.items() if entry.kind == "gram" and entry.needs_exchange}
    runs = [(m, g) for m in methods if m != "mean" for g in (kinds if m in gram else ["parameters"])]
    for method, gradients in [("mean", "parameters"), *runs]:
        cfg = benchlib.config(suite={"path": suite}, model={"trunk": {"widths": widths}},
                              training={"epochs": epochs, "batch_size": BATCH, "steps_per_epoch": steps},
                              scaling={"num_workers": WORKERS}, aggregation={"method": method, "gradients": gradients})
        out = benchlib.train(cfg, f"many-{method}-{gradients}")
        rate = benchlib.best_throughput(out)
        mean = mean or rate
        rows.append([method, gradients if method in gram else "", f"{rate:,.0f}", f"{rate / mean:.2f}x",
                     out.metrics["val/mean_loss"]])
        print(f"[bench] {k} tasks {method} {gradients}: {rate:,.0f} samples/s", flush=True)
    print()
    print(f"{k} mmoe tasks on {WORKERS} workers, trunk {tuple(widths)}, batch {BATCH} per task, {steps} steps x {epochs} epochs")
    print(table(["method", "gradients", "samples/s", "x mean", "final val loss"], rows))


if __name__ == "__main__":
    main()
