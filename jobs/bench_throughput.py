"""Throughput of the 2-worker distributed run against one process doing the same work.

For each model (the article's 10-100-50 trunk and a medium 4 x 1024 trunk) on the
seed-example suite (2 tasks, one per worker, same batch size per task), printed side by side
from this one run, as samples/s over all tasks:

  loop, all cores   one process trains both tasks with the worker's own step function,
                    torch using every core (no Ray, no DDP)
  loop, one core    the same with one thread
  DDP ...           `mtml train` with 2 workers, one thread each, under each setting listed

Ratios: against the all-cores loop (the target) and against the one-core loop (scaling
efficiency; ideal 2x). The `mmoe` row has the trunk's parameter count (4 experts of 10-24-50
and their gates: 6,144 parameters, the trunk 6,150); its loops are the plain trunk's, so set it
beside the plain DDP row of the same batch. Settings that change the optimisation (sync_every: local steps between
trunk averages) also print their final validation loss beside plain DDP's.
Every number is the best of several timed passes/epochs after a warm-up: this machine is noisy.

Usage: python jobs/bench_throughput.py [--epochs 4] [--steps 400]
"""

from __future__ import annotations

import argparse
import os

import benchlib

from distributed_mtml.report import table

MODELS = {
    "article 10-100-50": {
        "widths": [100, 50],
        "steps_scale": 1.0,
        "variants": [
            ("DDP", {}),
            ("DDP sync_every=16", {"training": {"sync_every": 16}}),
            # 4 experts of 10-24-50 and their gates hold 6,144 parameters, the 10-100-50 trunk 6,150
            ("DDP mmoe, 4 experts 24-50", {"model": {"architecture": "mmoe", "experts": 4, "trunk": {"widths": [24, 50]}}}),
            ("DDP", {"training": {"batch_size": 512}}),
            ("DDP sync_every=4", {"training": {"batch_size": 512, "sync_every": 4}}),
            ("DDP sync_every=16", {"training": {"batch_size": 512, "sync_every": 16}}),
        ],
    },
    "medium 4x1024": {
        "widths": [1024] * 4,
        "steps_scale": 0.1,
        "variants": [
            ("DDP", {}),
            ("DDP fp16 + 100MB buckets", {"scaling": {"grad_compression": "fp16", "bucket_cap_mb": 100}}),
            ("DDP sync_every=4", {"training": {"sync_every": 4}}),
            ("DDP", {"training": {"batch_size": 256}}),
            ("DDP 5MB buckets", {"training": {"batch_size": 256}, "scaling": {"bucket_cap_mb": 5}}),
            ("DDP 100MB buckets", {"training": {"batch_size": 256}, "scaling": {"bucket_cap_mb": 100}}),
            ("DDP fp16", {"training": {"batch_size": 256}, "scaling": {"grad_compression": "fp16"}}),
            ("DDP sync_every=4", {"training": {"batch_size": 256, "sync_every": 4}}),
        ],
    },
}


def _config(widths: list[int], steps: int, epochs: int, workers: int, cpus: float, extra: dict):
    sections = {
        "suite": {"generator": "seed-example", "options": {"rows": 4000}},
        "model": {"trunk": {"widths": widths}},
        "training": {"epochs": epochs, "batch_size": 64, "steps_per_epoch": steps, "lr": 0.001},
        "scaling": {"num_workers": workers, "cpus_per_worker": cpus},
    }
    for key, value in extra.items():
        sections[key] = {**sections[key], **value}
    return benchlib.config(**sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400, help="steps per epoch for the article's model at batch 64")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for model in args.models:
        spec = MODELS[model]
        loops: dict[int, tuple[float, float]] = {}  # batch size -> (all cores, one core)
        for name, extra in spec["variants"]:
            batch = extra.get("training", {}).get("batch_size", 64)
            steps = max(int(args.steps * spec["steps_scale"] * 64 / batch), 10)
            if batch not in loops:
                base = _config(spec["widths"], steps, args.epochs, 1, cores, extra)
                loops[batch] = (benchlib.loop_throughput(base, cores, steps), benchlib.loop_throughput(base, 1, steps))
                every, one = loops[batch]
                rows.append([model, batch, f"loop, all {cores} cores", every, 1.0, every / one, ""])
                rows.append([model, batch, "loop, one core", one, one / every, 1.0, ""])
            every, one = loops[batch]
            out = benchlib.train(_config(spec["widths"], steps, args.epochs, 2, cores / 2, extra), name.replace(" ", "_"))
            speed = benchlib.best_throughput(out)
            rows.append([model, batch, name, speed, speed / every, speed / one, out.metrics["val/mean_loss"]])
    print()
    headers = ["model", "batch/task", "run", "samples/s", "x loop all cores", "x loop one core", "final val loss"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
