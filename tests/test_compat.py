"""Every private Ray and MLflow API that `compat` relies on, pinned against the installed
versions: an upgrade that moves one fails here, by name, instead of in a user's run. And
`compat`'s own behaviour where what it touches is missing."""

import json
import logging
import os
import sys

import pytest

from distributed_mtml import compat


def test_ray_train_report_logger_module_exists():
    from ray.train.v2._internal.execution import context

    assert os.path.exists(context.__file__)


def test_ray_counts_cpus_with_get_num_cpus():
    from ray._private.utils import get_num_cpus

    assert compat.ray_cpu_count() == int(get_num_cpus()) >= 1


def test_ray_trainer_has_the_sigint_hook_compat_replaces():
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))


def test_ray_checkpoint_snapshot_name_and_layout():
    """The file name is Ray's constant; the layout is what Ray's checkpoint manager writes."""
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == compat.RAY_CHECKPOINT_SNAPSHOT
    with open(checkpoint_manager.__file__, encoding="utf-8") as f:
        source = f.read()
    assert compat.RAY_SNAPSHOT_LATEST in source and "checkpoint_dir_name" in source
    text = json.dumps({compat.RAY_SNAPSHOT_LATEST: {"checkpoint_dir_name": "checkpoint_2026"}})
    assert compat.latest_checkpoint_dir_name(text) == "checkpoint_2026"
    assert compat.latest_checkpoint_dir_name(json.dumps({compat.RAY_SNAPSHOT_LATEST: None})) is None
    with pytest.raises(ValueError):
        compat.latest_checkpoint_dir_name(text[:-5])  # cut short by a full disk


def test_mlflow_dataset_entity():
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    dataset = MetaDataset(resolve_dataset_source("s3://bucket/suite/task.parquet"), name="task", digest="abc")
    entity = compat.mlflow_dataset_entity(dataset)
    assert isinstance(entity, Dataset) and entity.name == "task" and entity.digest == "abc"


def test_mlflow_store_schema_head_and_tables(tmp_path):
    """What `store.schema_problem` compares a store with: a new store is at the head, with every table."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path}/m.db").search_experiments()
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (compat.mlflow_schema_head(),)
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "metrics", "registered_models"} <= compat.mlflow_store_tables() <= tables


def test_mlflow_schema_head_is_cached_per_migrations(tmp_path, monkeypatch):
    """Alembic is asked once; later commands read the head from the cache, and a cache from other
    migration files is not used."""
    from mlflow.store.db import utils

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    head = compat.mlflow_schema_head()
    assert head == utils._get_latest_schema_revision()
    monkeypatch.setattr(utils, "_get_latest_schema_revision", lambda: pytest.fail("alembic asked again"))
    assert compat.mlflow_schema_head() == head
    (cached,) = (tmp_path / "distributed_mtml").glob("mlflow-schema-head-*")
    cached.rename(tmp_path / "elsewhere")
    monkeypatch.setattr(utils, "_get_latest_schema_revision", lambda: "asked")
    assert compat.mlflow_schema_head() == "asked"


def test_mlflow_requirements_unscanned_reads_versions_and_restores_the_map():
    """Model logging's requirement check inside: no scan of installed distributions, a mismatch
    still found (read from the package's own version), and MLflow's map left as it was."""
    from mlflow.utils import requirements_utils as reqs

    before = reqs._MODULES_TO_PACKAGES
    with compat.mlflow_requirements_unscanned():
        assert reqs._check_requirement_satisfied("torch==0.0.1").installed_version is not None
        assert reqs._MODULES_TO_PACKAGES == {} if before is None else reqs._MODULES_TO_PACKAGES is before
    assert reqs._MODULES_TO_PACKAGES is before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_glibc_takes_the_mmap_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert compat.hold_mmap_threshold() is True
    with compat.heap_for_training():
        pass
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert compat.hold_mmap_threshold() is False  # the user's own setting wins


def test_missing_pieces_are_said_once_and_skipped(monkeypatch, caplog):
    monkeypatch.setattr(compat.sys, "platform", "darwin")
    monkeypatch.setattr(compat, "_said", set())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with caplog.at_level(logging.WARNING, logger="distributed_mtml.compat"):
        assert compat.hold_mmap_threshold() is False and compat.hold_mmap_threshold() is False
        compat.give_back()
        assert compat.take_over_trainer_sigint(object(), lambda controller: None) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "skipped on darwin" in lines[0] and "SIGINT hook" in lines[1]


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("MTML_COMPAT_A", "before")
    monkeypatch.delenv("MTML_COMPAT_B", raising=False)
    with compat.environment(MTML_COMPAT_A="inside", MTML_COMPAT_B="new"):
        assert os.environ["MTML_COMPAT_A"] == "inside" and os.environ["MTML_COMPAT_B"] == "new"
    assert os.environ["MTML_COMPAT_A"] == "before" and "MTML_COMPAT_B" not in os.environ
    assert compat.default_environment(MTML_COMPAT_A="other") == {"MTML_COMPAT_A": "before"}


def test_peak_resident_memory_is_read():
    assert compat.peak_resident_mb() > 10
