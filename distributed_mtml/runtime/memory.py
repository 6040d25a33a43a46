"""Allocator settings that keep a process's memory bounded by what it holds, not by what it read.

Reading a task through a process leaves its resident memory grown with the data even though
nothing is held, because of two allocators' retention, not of our buffers:
- pyarrow's default pool (mimalloc here) keeps freed pages for reuse: reading a 2M-row task's
  test split in batches peaked 64 MB above the start with it, 32 MB with the system allocator.
- glibc raises its mmap threshold each time a large block is freed (up to 32 MB); the model's
  activations and each batch's arrays then come from the heap, whose freed holes are kept.
  Evaluating a 4 x 1024 trunk on that split peaked 320 MB higher than with the threshold held
  at 128 KB. Held there, though, every large allocation is a fresh mapping: a 4 x 1024 training
  step took 30% longer. So it is held only where no training follows: the driver's end of run.
"""

from __future__ import annotations

import ctypes
import os

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def system_arrow_pool() -> dict[str, str]:
    """Makes pyarrow allocate with the system allocator in this process (read at pyarrow's first
    allocation; a user's own setting wins), and returns the variable for other processes."""
    os.environ.setdefault(POOL_ENV, "system")
    return {POOL_ENV: os.environ[POOL_ENV]}


def hold_mmap_threshold() -> None:
    """From now on, large blocks are mapped and unmapped, not kept in the heap (glibc; a no-op
    elsewhere or where the user set `MALLOC_MMAP_THRESHOLD_`)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator, its own behaviour
        pass


def give_back() -> None:
    """Returns the heap's free memory to the system (glibc's `malloc_trim`; pyarrow's system pool
    calls it): after reading every row of a suite to plan a run, 106 MB of freed buffers stayed
    resident in the driver (2M rows), under whatever it did next."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
