"""Which worker owns which task: the one place that answers rank <-> task questions."""

from __future__ import annotations

from distributed_mtml.errors import InputError


def place_tasks(task_names: list[str], num_workers: int) -> list[list[str]]:
    """Round-robin: task i goes to worker i mod W, so load stays within one task of even.

    Every worker must own at least one task: a worker with nothing to train would still
    have to join every trunk synchronisation, which is wasted capacity and a config error.
    """
    if num_workers < 1:
        raise InputError(f"scaling.num_workers: must be at least 1, got {num_workers}")
    if num_workers > len(task_names):
        raise InputError(
            f"scaling.num_workers: {num_workers} workers for {len(task_names)} tasks; "
            f"use at most {len(task_names)} so that every worker owns a task"
        )
    placement: list[list[str]] = [[] for _ in range(num_workers)]
    for i, name in enumerate(task_names):
        placement[i % num_workers].append(name)
    return placement
