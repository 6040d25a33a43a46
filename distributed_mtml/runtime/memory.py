"""Allocator settings that keep a process's memory bounded by what it holds, not by what it read.

Reading a task through a process leaves its resident memory grown with the data even though
nothing is held, because of two allocators' retention, not of our buffers:
- glibc raises its mmap threshold each time a large block is freed (up to 32 MB); a batch's
  arrays and a model's activations then come from per-thread heaps whose freed holes are kept.
  The plan's scan of a 2 x 30M-row suite (pyarrow's reader threads) peaked 1,204 MB above its
  start; with the threshold held at 128 KB, 67 MB (and took 14 s instead of 7). Evaluating a
  4 x 1024 trunk on a 2M-row test split peaked 320 MB higher without it. `malloc_trim` after
  each batch did not help (993 MB): the holes are spread over the heaps.
- pyarrow's default pool (mimalloc here) keeps freed pages for reuse: reading a 2M-row task's
  test split in batches peaked 64 MB above the start with it, 32 MB with the system allocator.
So `mtml` holds the threshold and uses the system pool from its start, and so do Ray Train
workers (`train.worker`): unheld, a 4 x 1024 trunk's first validation pass over a 300,000-row
split grew a worker by 140 MB. Held, though, every large block is a fresh mapping, and a
4 x 1024 training step took 30% longer: training epochs and meta-training's updates, in a
worker or in this process (local mode), run with the threshold at glibc's ceiling instead
(`heap_for_training`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value
HEAP_THRESHOLD = 32 * 1024 * 1024  # the ceiling glibc's dynamic threshold climbs to (64-bit)
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def system_arrow_pool() -> dict[str, str]:
    """Makes pyarrow allocate with the system allocator in this process, unless the user chose a
    pool, and returns the variable that does it in other processes. Arrow reads it once, at its
    first allocation, so the CLI calls this before importing anything else: called after our
    imports, the process's pool had stayed mimalloc (`pyarrow.set_memory_pool` does not reach
    the dataset scanner's), and `mtml data validate` of 2 x 30M rows peaked at 1,491 MB instead
    of 129."""
    os.environ.setdefault(POOL_ENV, "system")
    return {POOL_ENV: os.environ[POOL_ENV]}


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose `mallopt` and `malloc_trim` these settings use)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own allocator, its own behaviour
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def hold_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> None:
    """From now on, blocks above `threshold` are mapped and unmapped, not kept in a heap (glibc;
    a no-op elsewhere or where the user set `MALLOC_MMAP_THRESHOLD_`)."""
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


@contextlib.contextmanager
def heap_for_training():
    """Training in this process: its blocks come from the heap and are reused step after step, as
    with glibc's own threshold once it has climbed; held again afterwards."""
    hold_mmap_threshold(HEAP_THRESHOLD)
    try:
        yield
    finally:
        hold_mmap_threshold()


def peak_resident_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux's VmHWM; not `ru_maxrss`, which a
    forked child starts with its parent's): what the memory tests and `jobs/bench_data.py`
    compare before and after a piece of work."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def give_back() -> None:
    """Returns the heap's free memory to the system (glibc's `malloc_trim`; pyarrow's system pool
    calls it): after reading every row of a suite to plan a run, 106 MB of freed buffers stayed
    resident in the driver (2M rows), under whatever it did next."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
