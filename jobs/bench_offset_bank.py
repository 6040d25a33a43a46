"""One worker's training step over many tasks: offsets as per-task parameters or in one bank.

    python jobs/bench_offset_bank.py [--tasks 100 1000 5000] [--rows 8] [--threads 1]

A worker owning T regression tasks of one shared head (the default `shared_plus_offset`, no
`model.head_hidden`) takes steps of `rows` rows a task (`multitask_step`, Adam, as the worker
does). Side by side, in one process: each task's offsets as its own two parameters (a
`ModuleDict` of per-task heads, as a hand-written multi-task script holds them; the step stacks
them) and the same offsets bound to one stacked bank (`heads/offset_bank.py`, what the worker
does). Printed: ms a step (median of the timed steps after a warm-up) and the ratio; the two
layouts' losses after the same steps must agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.heads.offset_bank import bind_offsets
from distributed_mtml.models import TaskShape, build_shared_heads, build_task_modules, build_trunk, head_parameters
from distributed_mtml.report import table
from distributed_mtml.runtime.worker import make_optimizer
from distributed_mtml.train.step import multitask_step


def _steps(tasks: int, rows: int, bound: bool, steps: int = 12) -> tuple[float, float]:
    """(median seconds a step after 2 warm-up steps, the last step's summed loss)."""
    cfg = ModelConfig(trunk=TrunkConfig(widths=[16]))
    shapes = [TaskShape(f"t{i}", "regression", 4) for i in range(tasks)]
    torch.manual_seed(0)
    trunk = build_trunk(cfg, shapes)
    shared = build_shared_heads(cfg, shapes, 0)
    modules = build_task_modules(cfg, shapes, 0, shared=shared)
    if bound:
        bind_offsets(modules)
    optimizer = make_optimizer("adam", [*trunk.parameters(), *head_parameters(modules)], 1e-3, 0.0)
    g = torch.Generator().manual_seed(1)
    batch = {s.name: (torch.randn(rows, 4, generator=g), torch.randn(rows, generator=g)) for s in shapes}
    by_name = {s.name: s for s in shapes}
    times, losses = [], {}
    for _ in range(steps):
        begin = time.perf_counter()
        losses = multitask_step(trunk, modules, by_name, batch, optimizer, 1 / tasks)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[2:]), float(losses.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker's `cpus_per_worker`)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for tasks in a.tasks:
        (own, own_loss), (bank, bank_loss) = _steps(tasks, a.rows, False), _steps(tasks, a.rows, True)
        rows.append([tasks, f"{own * 1e3:.1f}", f"{bank * 1e3:.1f}", f"{own / bank:.1f}x",
                     "yes" if abs(own_loss - bank_loss) <= 1e-6 * max(1.0, abs(own_loss)) else f"NO ({own_loss} vs {bank_loss})"])
        print(f"[bench] {tasks} tasks: {own * 1e3:.1f} ms per-task parameters, {bank * 1e3:.1f} ms bank", flush=True)
    print(table(["tasks", "per-task parameters ms/step", "bank ms/step", "speed-up", "same losses"], rows))


if __name__ == "__main__":
    main()
