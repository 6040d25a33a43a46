"""The task-suite format: a `suite.yaml` index plus one Parquet file (or directory) per task.

Paths in `suite.yaml` may be relative to the suite directory, absolute, or any URI that
pyarrow's filesystem layer understands (`file://`, `s3://`, `gs://`, `hdfs://`, ...), so
the same suite can live on a laptop disk or in a bucket that every cluster node reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field

SUITE_FILE = "suite.yaml"
SPLITS = ("train", "val", "test")


class TaskSpec(BaseModel):
    """One task of a suite, exactly as written in `suite.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["classification", "regression"]
    path: str
    target: str
    features: list[str] | None = None
    num_classes: int | None = Field(default=None, ge=2)
    split_column: str = "split"


class SuiteSpec(BaseModel):
    """The parsed `suite.yaml`: a name and its tasks."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    tasks: list[TaskSpec]


@dataclass
class TaskData:
    """One task's numeric arrays per split, ready to become tensors."""

    spec: TaskSpec
    features: list[str]
    x: dict[str, np.ndarray]  # split -> [N, F] float32
    y: dict[str, np.ndarray]  # split -> [N] int64 (classification) or float32


def _is_uri(path: str) -> bool:
    return "://" in path


def join_path(base: str, path: str) -> str:
    """Resolves `path` against the suite location `base` unless it is absolute or a URI."""
    if _is_uri(path) or os.path.isabs(path):
        return path
    if _is_uri(base):
        return base.rstrip("/") + "/" + path
    return os.path.abspath(os.path.join(base, path))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if _is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_text(path: str) -> str:
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    fs, inner = _filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def suite_yaml_path(suite_dir: str) -> str:
    return join_path(suite_dir, SUITE_FILE)


def load_suite_spec(suite_dir: str) -> SuiteSpec:
    """Reads `suite.yaml` with `yaml.safe_load`; raises pydantic's ValidationError on bad keys."""
    raw = yaml.safe_load(read_text(suite_yaml_path(suite_dir)))
    return SuiteSpec.model_validate(raw)


def read_table(suite_dir: str, task: TaskSpec) -> pa.Table:
    """Reads a task's Parquet file or directory of Parquet files."""
    fs, inner = _filesystem(join_path(suite_dir, task.path))
    return pq.read_table(inner, filesystem=fs)


def feature_columns(task: TaskSpec, schema: pa.Schema) -> list[str]:
    """The declared features, or every numeric column except target and split."""
    if task.features is not None:
        return list(task.features)
    skip = {task.target, task.split_column}
    return [
        f.name
        for f in schema
        if f.name not in skip and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    ]


def table_to_task_data(task: TaskSpec, table: pa.Table) -> TaskData:
    """Splits a validated table into per-split numpy arrays."""
    features = feature_columns(task, table.schema)
    x_all = np.column_stack(
        [table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in features]
    )
    y_all = table.column(task.target).to_numpy(zero_copy_only=False)
    y_all = y_all.astype(np.int64 if task.type == "classification" else np.float32)
    split = np.asarray(table.column(task.split_column).to_pylist())
    x = {s: x_all[split == s] for s in SPLITS}
    y = {s: y_all[split == s] for s in SPLITS}
    return TaskData(spec=task, features=features, x=x, y=y)


def load_task(suite_dir: str, task: TaskSpec) -> TaskData:
    return table_to_task_data(task, read_table(suite_dir, task))


def write_suite(out_dir: str, spec: SuiteSpec, tables: dict[str, pa.Table]) -> None:
    """Writes `suite.yaml` and one Parquet file per task (keyed by task name)."""
    for task in spec.tasks:
        fs, inner = _filesystem(join_path(out_dir, task.path))
        fs.create_dir(os.path.dirname(inner), recursive=True)
        pq.write_table(tables[task.name], inner, filesystem=fs)
    text = yaml.safe_dump(spec.model_dump(exclude_none=True, exclude_defaults=False), sort_keys=False)
    write_text(suite_yaml_path(out_dir), text)
