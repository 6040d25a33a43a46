"""What can break under another Ray, MLflow, OS or C library, in one place.

Everything here touches something that is not a public, stable API: Ray's and MLflow's private
modules and attributes, glibc's allocator, process-wide environment variables. Each function
checks that what it touches is there and, where it is not (macOS, musl, a newer Ray), says so in
one log line and carries on with what still works. `tests/test_compat.py` pins each private API
against the installed Ray and MLflow, so an upgrade that moves one fails that test by name, not
a user's run.

Allocator settings (why they exist). Reading a task leaves a process's resident memory grown
with the data even though nothing is held, because of two allocators' retention:
- glibc raises its mmap threshold each time a large block is freed (up to 32 MB); a batch's
  arrays and a model's activations then come from per-thread heaps whose freed holes are kept.
  The plan's scan of a 2 x 30M-row suite peaked 1,204 MB above its start; with the threshold held
  at 128 KB, 67 MB (and took 14 s instead of 7). Held, though, every large block is a fresh
  mapping, and a 4 x 1024 training step took 30% longer: training runs with the threshold at
  glibc's ceiling instead (`heap_for_training`).
- pyarrow's default pool (mimalloc) keeps freed pages for reuse: reading a 2M-row test split in
  batches peaked 64 MB above the start with it, 32 MB with the system allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)
_said: set[str] = set()


def _once(key: str, message: str) -> None:
    """One log line per missing piece per process, however often it is asked for."""
    if key not in _said:
        _said.add(key)
        log.warning("[mtml] %s", message)


# ---- process-wide environment variables ------------------------------------------------------

_environ_lock = threading.Lock()  # our own writers, from any thread, one at a time


def set_environment(**values: str) -> None:
    """Sets process-wide variables for what this process and its children read later."""
    with _environ_lock:
        os.environ.update(values)


def default_environment(**values: str) -> dict[str, str]:
    """Sets each variable the user has not set; returns the values now in force."""
    with _environ_lock:
        for k, v in values.items():
            os.environ.setdefault(k, v)
        return {k: os.environ[k] for k in values}


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Variables set (None: unset) for the block, as they were afterwards. Process-wide: only
    for settings a library reads at call time and offers no argument for."""
    with _environ_lock:
        before = {k: os.environ.get(k) for k in values}
        _apply(values)
    try:
        yield
    finally:
        with _environ_lock:
            _apply(before)


def _apply(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ---- allocators --------------------------------------------------------------------------------

ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value
HEAP_THRESHOLD = 32 * 1024 * 1024  # the ceiling glibc's dynamic threshold climbs to (64-bit)
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def system_arrow_pool() -> dict[str, str]:
    """Makes pyarrow allocate with the system allocator in this process, unless the user chose a
    pool, and returns the variable that does it in other processes. Arrow reads it once, at its
    first allocation, so the CLI calls this before importing anything else (`pyarrow.set_memory_pool`
    does not reach the dataset scanner's allocations)."""
    return default_environment(**{ARROW_POOL_ENV: "system"})


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, whose `mallopt` and `malloc_trim` the settings use."""
    if not sys.platform.startswith("linux"):
        _once("glibc", f"allocator settings skipped on {sys.platform}: they are glibc's; memory may grow with "
                       "what a process has read")
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    if libc is None or not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        _once("glibc", "allocator settings skipped: the C library is not glibc")
        return None
    return libc


def hold_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """From now on, blocks above `threshold` are mapped and unmapped, not kept in a heap. False
    where it did nothing: not glibc, the user set `MALLOC_MMAP_THRESHOLD_`, or mallopt refused."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:  # 1 on success (malloc.h)
        _once("mallopt", f"glibc's mallopt refused an mmap threshold of {threshold} bytes")
        return False
    return True


@contextlib.contextmanager
def heap_for_training() -> Iterator[None]:
    """Training in this process: its blocks come from the heap and are reused step after step, as
    with glibc's own threshold once it has climbed; held again afterwards."""
    hold_mmap_threshold(HEAP_THRESHOLD)
    try:
        yield
    finally:
        hold_mmap_threshold()


def give_back() -> None:
    """Returns free heap memory to the system (pyarrow's pool, then glibc's `malloc_trim`): after
    reading every row of a suite to plan a run, 106 MB of freed buffers stayed in the driver."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_resident_mb() -> float:
    """This process's peak resident memory so far, in MB: Linux's VmHWM, which starts afresh in a
    new program (`ru_maxrss` carries a forked parent's peak over `exec`); elsewhere `ru_maxrss`,
    said once."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        _once("vmhwm", "peak memory from ru_maxrss: no /proc/self/status VmHWM on this system")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KB on Linux


# ---- Ray's private parts -----------------------------------------------------------------------

RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants
RAY_SNAPSHOT_LATEST = "latest_checkpoint_result"


def latest_checkpoint_dir_name(snapshot_text: str) -> str | None:
    """The newest registered checkpoint's directory name in Ray Train's checkpoint manager
    snapshot (written once a checkpoint is whole), or None where it names none. ValueError where
    the text is not whole JSON (a full disk can cut Ray's rewrite of it short)."""
    import json

    latest = json.loads(snapshot_text).get(RAY_SNAPSHOT_LATEST) or {}
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    if latest and name is None:
        _once("snapshot", f"Ray's {RAY_CHECKPOINT_SNAPSHOT} has a layout this version does not know: no "
                          "checkpoint is found in it")
    return name


def quiet_ray_train_report_log() -> None:
    """Ray Train logs every report's full metrics at INFO under a logger named for its
    execution-context module, outside the `ray.train` tree that `LoggingConfig` reaches."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        _once("report-log", "Ray Train's report logger was not found: every report's metrics may be logged")
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ray_cpu_count() -> int:
    """The CPUs a local Ray would start with (cgroup limits included), as Ray counts them."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        _once("cpus", "Ray's CPU count was not found: os.cpu_count() is used, which ignores container limits")
        return os.cpu_count() or 1
    return int(get_num_cpus())


def take_over_trainer_sigint(trainer: Any, register: Callable[[Any], None]) -> bool:
    """Has the trainer hand its controller to `register` instead of installing Ray's own SIGINT
    handler (which logs and aborts without letting the run be marked KILLED)."""
    if not hasattr(trainer, "_register_sigint_handler"):
        _once("sigint", "Ray Train's SIGINT hook was not found: Ctrl-C is handled by Ray's own handler")
        return False
    trainer._register_sigint_handler = register
    return True


# ---- MLflow's private parts --------------------------------------------------------------------

def mlflow_dataset_entity(dataset: Any) -> Any:
    """An MLflow dataset as the entity `log_inputs` takes (MLflow has no public converter)."""
    return dataset._to_mlflow_entity()


def mlflow_schema_head() -> str:
    """The store schema revision this MLflow needs (MLflow checks it privately; no public call).
    Alembic finds it by importing all of MLflow's migration scripts, 0.9 s of every command that
    opens a store here; it is kept in the user's cache, keyed by the migration files' names and
    times, so an MLflow upgrade (or an edited migration) asks alembic again."""
    import hashlib

    import mlflow.store.db_migrations as migrations

    versions = os.path.join(os.path.dirname(migrations.__file__), "versions")
    names = sorted(n for n in os.listdir(versions) if n.endswith(".py"))
    stamp = "".join(f"{n}:{os.stat(os.path.join(versions, n)).st_mtime_ns};" for n in names)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    cached = os.path.join(cache_folder(), f"mlflow-schema-head-{key}")
    with contextlib.suppress(OSError):
        with open(cached) as f:
            head = f.read().strip()
        if head:
            return head
    from mlflow.store.db.utils import _get_latest_schema_revision  # alembic and SQLAlchemy with it

    head = _get_latest_schema_revision()
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = f"{cached}.{os.getpid()}"
        with open(partial, "w") as f:
            f.write(head)
        os.replace(partial, cached)
    return head


@contextlib.contextmanager
def mlflow_requirements_unscanned() -> Iterator[None]:
    """MLflow's model logging without its scan of every installed distribution. Logging a model
    checks each pip requirement against this environment, and first maps every installed
    package to its modules (`packages_distributions`, 1 s of a 10 s run here) though it only
    needs the versions. Ours are pinned from this environment's own versions, so the check
    cannot differ; an empty map makes MLflow read each version directly. The map is MLflow's
    private module global, left as it was."""
    try:
        from mlflow.utils import requirements_utils as reqs
    except ImportError:
        yield
        return
    if not hasattr(reqs, "_MODULES_TO_PACKAGES"):
        _once("mlflow-requirements-map", "MLflow's requirement map moved; model logging scans installed packages")
        yield
        return
    scanned = reqs._MODULES_TO_PACKAGES
    if scanned is None:
        reqs._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        if scanned is None:
            reqs._MODULES_TO_PACKAGES = None


def cache_folder() -> str:
    """Where what is made once a machine is kept: `$XDG_CACHE_HOME/distributed_mtml` or
    `~/.cache/distributed_mtml`."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distributed_mtml")


def mlflow_store_tables() -> set[str]:
    """The tables of a complete MLflow store: what MLflow's own check of a store compares with."""
    from mlflow.store.db.utils import Base  # its module imports every table's model

    return set(Base.metadata.tables)
