"""The local SQLite store (`./mlflow.db`): created under a file lock, checked before a run uses it.

MLflow creates and migrates a new SQLite store on first use, in whichever process opens it
first. Three `mtml train` started together in a fresh directory each ran the migrations at once:
all three failed, and the store was left half-migrated, so every later command in that directory
failed too. Here every process opens the store once under a lock beside it (`<store>.lock`, the
`filelock` package), so one creates it while the others wait; and a store that a crash or an
older MLflow left behind the schema this MLflow needs is reported in one line with the way out,
before a run starts, instead of as a migration traceback after.

Creating a store runs MLflow's migrations, 1.2-1.7 s of every new store here (each test, each
first command in a new folder). A new store is instead a copy of an empty one made once a machine
and MLflow version (`template`, in the user's cache), into which MLflow then adds its default
experiment as it would have: its artifact place is the new store's, not the template's.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid

from distributed_mtml import compat
from distributed_mtml.errors import InputError

LOCK_WAIT_S = 300  # how long a command waits for another one creating the store
_READY: set[str] = set()  # the stores this process has opened (checked once a process)


def sqlite_path(uri: str) -> str | None:
    """The file of a `sqlite:///` tracking URI; None for a server or another database."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def ready(uri: str) -> None:
    """Opens the tracking store at `uri` once in this process: a SQLite file is created (tables,
    migrations, the model registry's tables) under its lock, or checked if it exists (without
    the lock where its folder is read-only: commands that only read it still work). Raises
    InputError naming the file when it is half-migrated, from an older MLflow or not a store."""
    path = sqlite_path(uri)
    if path is None or uri in _READY:
        return
    from filelock import FileLock, Timeout

    folder = os.path.dirname(path) or "."
    if os.path.exists(path) and not os.access(folder, os.W_OK):  # a read-only place: read it, create nothing
        problem = schema_problem(path)
        if problem:
            raise InputError(problem)
        _READY.add(uri)
        return
    os.makedirs(folder, exist_ok=True)  # as MLflow would, for the lock file beside it
    lock = path + ".lock"
    try:
        with FileLock(lock, timeout=LOCK_WAIT_S):
            problem = schema_problem(path)
            if problem:
                raise InputError(problem)
            _open(uri)
    except Timeout:
        raise InputError(f"{path}: another process has held {lock} for {LOCK_WAIT_S} s while creating the MLflow "
                         "store; if none is running, delete the lock file") from None
    _READY.add(uri)


def check_writable(uri: str) -> None:
    """A command that makes a run must write to the store, and SQLite writes a journal beside it."""
    path = sqlite_path(uri)
    if path is None:
        return
    for where in (path, os.path.dirname(path) or "."):
        if os.path.exists(where) and not os.access(where, os.W_OK):
            raise InputError(f"{path}: the MLflow store is read-only here (no write permission on {where}); "
                             "pass --tracking-uri to a store you can write")


def schema_problem(path: str) -> str | None:
    """What is wrong with an existing store's schema, as the line a user reads; None when it is
    new, empty or at the schema this MLflow needs. Read with sqlite3 alone: MLflow itself would
    try to migrate it."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables \
                else None
    except sqlite3.DatabaseError as e:
        return f"{path}: not an MLflow store SQLite can read ({e}); move it aside or pass another --tracking-uri"
    if not tables:
        return None
    head = compat.mlflow_schema_head()
    if version is not None and version[0] == head and compat.mlflow_store_tables() <= tables:
        return None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    found = f"schema {version[0]}" if version else "no schema version"
    how = f"drop the leftover table(s) {', '.join(leftovers)}, then " if leftovers else ""
    return (f"{path}: the MLflow store was left half-migrated or by an older MLflow ({found}, this MLflow needs {head}): "
            f"back it up, {how}run `mlflow db upgrade sqlite:///{path}`; or move the file aside to start a new store")


def template() -> str | None:
    """An empty store at this MLflow's schema without its default experiment, made once (under
    its lock) in `$XDG_CACHE_HOME/distributed_mtml` or `~/.cache/distributed_mtml`; None where
    that folder cannot be written, and a new store is then migrated in place."""
    import mlflow
    from filelock import FileLock

    folder = compat.cache_folder()
    path = os.path.join(folder, f"mlflow-{mlflow.__version__}-{compat.mlflow_schema_head()}.db")
    try:
        os.makedirs(folder, exist_ok=True)
        with FileLock(path + ".lock", timeout=LOCK_WAIT_S):
            if os.path.exists(path) and schema_problem(path) is None:
                return path
            making = f"{path}.{uuid.uuid4().hex}.new"  # a name MLflow has not cached a store for
            try:
                _migrate(f"sqlite:///{making}")
                with sqlite3.connect(making) as db:  # MLflow adds it on first open, with that store's artifact place
                    db.execute("DELETE FROM experiments WHERE experiment_id = 0")
                os.replace(making, path)
            finally:
                if os.path.exists(making):
                    os.remove(making)
            return path
    except OSError:
        return None


def _open(uri: str) -> None:
    """MLflow's tracking and registry stores of `uri`; a new one is a copy of the `template`."""
    path = sqlite_path(uri)
    if path and (not os.path.exists(path) or os.path.getsize(path) == 0):
        empty = template()
        if empty:
            shutil.copyfile(empty, path)
    _migrate(uri)


def _migrate(uri: str) -> None:
    """MLflow's tracking and registry stores of `uri`, each created (and migrated) if new."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
