"""The local SQLite store when several commands start at once, and when it cannot be used."""

import os
import sqlite3
import subprocess
import sys

import pytest

from distributed_mtml import store
from distributed_mtml.errors import InputError
from distributed_mtml.tracking import Tracker

STARTS = 4
START_RUN = """
import sys
from distributed_mtml.tracking import Tracker
Tracker(sys.argv[1]).create_run("together", "run", {}, {"lr": 0.1}, config_name="together")
print("started")
"""


def test_commands_started_together_on_a_new_store_all_start_and_leave_it_whole(tmp_path):
    """Without the lock, three such starts all failed in MLflow's migrations and left the file
    half-migrated; here each waits for the one creating the store, and all find one experiment."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", START_RUN, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(STARTS)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * STARTS, "\n".join(o[-1500:] for o in outputs)
    path = str(tmp_path / "mlflow.db")
    assert store.schema_problem(path) is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'").fetchall()
        assert db.execute("SELECT COUNT(*) FROM experiments WHERE name = 'together'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (STARTS,)


def test_a_store_this_user_cannot_write_is_refused_for_a_run_and_still_read(tmp_path, monkeypatch):
    """(As root every file is writable, so the permission is what `os.access` answers here.)"""
    uri, path = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "mlflow.db")
    Tracker(uri).create_run("e", "made-before", {}, {})
    store._READY.discard(uri)  # as a new process
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p in (path, str(tmp_path)) else writable(p, mode))
    assert [r.info.run_name for r in Tracker(uri).client().search_runs(["1"])] == ["made-before"]
    with pytest.raises(InputError, match=f"{path}: the MLflow store is read-only here"):
        Tracker(uri).create_run("e", "new", {}, {})


def test_a_file_that_is_not_a_store_is_refused_naming_it(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_text("not a database, but notes someone kept here\n" * 100)
    assert store.schema_problem(str(path)).startswith(f"{path}: not an MLflow store SQLite can read")


def test_a_new_store_is_a_copy_of_the_cached_template_with_its_own_default_experiment(tmp_path, monkeypatch):
    """The template holds no experiment: MLflow adds its default one on first open, with the
    artifact place it would have given a store migrated here. A broken template is made again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made = store.template()
    assert made.startswith(str(tmp_path / "cache" / "distributed_mtml"))
    assert store.schema_problem(made) is None
    with sqlite3.connect(made) as db:
        assert db.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    uri = f"sqlite:///{tmp_path}/work/mlflow.db"
    default = Tracker(uri).client().get_experiment("0")
    assert (default.name, default.artifact_location) == ("Default", str(tmp_path / "work" / "mlruns" / "0"))
    Tracker(uri).create_run("e", "first", {}, {})
    assert store.schema_problem(str(tmp_path / "work" / "mlflow.db")) is None
    with open(made, "w") as f:
        f.write("a template cut short by a full disk")
    assert store.template() == made and store.schema_problem(made) is None
