"""The task-suite format: a `suite.yaml` index plus one Parquet file (or directory) per task,
or one table whose `group_column` makes a task of every distinct value (`tasks.py`).

Paths in `suite.yaml` may be relative to the suite directory, absolute, or any URI that
pyarrow's filesystem layer understands (`file://`, `s3://`, `gs://`, `hdfs://`, ...), so
the same suite can live on a laptop disk or in a bucket that every cluster node reads.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

SUITE_FILE = "suite.yaml"
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


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
    group_column: str | None = Field(
        default=None, description="a column whose every distinct value is a task of this entry, named <name>/<value>")
    min_group_rows: int = Field(default=1, ge=1, description="groups with fewer rows are left out (or pooled)")
    small_groups: Literal["drop", "pool"] = Field(
        default="drop", description="what becomes of groups under min_group_rows: left out, or one task <name>/_pooled")
    _seeded_split: tuple[tuple[float, ...], int] = PrivateAttr(default=(SPLIT_FRACTIONS, 0))
    _groups: tuple | None = PrivateAttr(default=None)  # an expanded group task: the values of its rows
    _entry: str | None = PrivateAttr(default=None)  # ... and the suite entry it came from
    _rows: int | None = PrivateAttr(default=None)  # ... and its rows in the table

    @property
    def grouped(self) -> bool:
        """A task made of some rows of its table: those whose group column holds one of `_groups`."""
        return self._groups is not None

    @property
    def entry(self) -> str:
        """The suite entry the task came from: its own name unless a group column made it."""
        return self._entry or self.name

    def split_is_optional(self) -> bool:
        """A task whose split column is the default may go without one (a seeded split is made);
        a column the suite names explicitly must exist."""
        return "split_column" not in self.model_fields_set


class SuiteSpec(BaseModel):
    """The parsed `suite.yaml`: a name, its tasks, and how to split a table that has no split
    column (train/val/test fractions and the seed of that draw)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    split_fractions: list[float] = Field(default_factory=lambda: list(SPLIT_FRACTIONS))
    split_seed: int = 0
    tasks: list[TaskSpec]
    _group_summaries: dict = PrivateAttr(default_factory=dict)  # entry -> `groups.GroupSummary` of what it made

    @field_validator("split_fractions")
    @classmethod
    def _three_fractions(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or min(value) <= 0 or abs(sum(value) - 1) > 1e-6:
            raise ValueError("expected three positive fractions (train, val, test) that sum to 1, e.g. [0.7, 0.15, 0.15]")
        return value

    @model_validator(mode="after")
    def _tasks_know_the_split(self) -> "SuiteSpec":
        for task in self.tasks:
            task._seeded_split = (tuple(self.split_fractions), self.split_seed)
        return self


@dataclass
class TaskData:
    """One task's numeric arrays per split, ready to become tensors."""

    spec: TaskSpec
    features: list[str]
    x: dict[str, np.ndarray]  # split -> [N, F] float32
    y: dict[str, np.ndarray]  # split -> [N] int64 (classification) or float32
    classes: list[str] | None = None  # string labels: class k is classes[k] (sorted order)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else self.spec.num_classes


def _is_uri(path: str) -> bool:
    return "://" in path


def join_path(base: str, path: str) -> str:
    """Resolves `path` against the suite location `base` unless it is absolute or a URI."""
    if _is_uri(path) or os.path.isabs(path):
        return path
    if _is_uri(base):
        return base.rstrip("/") + "/" + path
    return os.path.abspath(os.path.join(base, path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if _is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def suite_yaml_path(suite_dir: str) -> str:
    return join_path(suite_dir, SUITE_FILE)


def read_file(suite_dir: str, task: TaskSpec) -> pa.Table:
    """Reads a task's Parquet file or directory of Parquet files whole (Hive partitions are columns)."""
    fs, inner = filesystem(join_path(suite_dir, task.path))
    return pq.read_table(inner, filesystem=fs)


def decoded(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded column as its plain values (a group column may come either way)."""
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def group_mask(task: TaskSpec, column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Which rows of `column` (the group column) belong to the group task `task`."""
    column = decoded(column)
    return pc.is_in(column, value_set=pa.array(list(task._groups)).cast(column.type))


def feature_columns(task: TaskSpec, schema: pa.Schema) -> list[str]:
    """The declared features, or every numeric column except target and split."""
    if task.features is not None:
        return list(task.features)
    skip = {task.target, task.split_column, task.group_column}
    return [
        f.name
        for f in schema
        if f.name not in skip and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    ]


def seeded_split(task: TaskSpec, rows: int) -> np.ndarray:
    """The split of a table without a split column: the suite's fractions (rounded, the rest to
    train) over a permutation seeded by the suite's `split_seed` and the task's name, so every
    command, worker and rerun sees the same rows in the same split."""
    fractions, seed = task._seeded_split
    n_val, n_test = (round(rows * f) for f in fractions[1:])
    labels = np.array(["train"] * (rows - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    order = np.random.default_rng([seed, zlib.crc32(task.name.encode())]).permutation(rows)
    return labels[np.argsort(order)]


def split_values(task: TaskSpec, table: pa.Table) -> np.ndarray:
    """Each row's split: the split column's values, or the seeded split when there is none."""
    if task.split_column not in table.column_names and task.split_is_optional():
        return seeded_split(task, table.num_rows)
    return np.asarray(table.column(task.split_column).to_pylist())


def is_label_column(column_type: pa.DataType) -> bool:
    """String (or dictionary-encoded string) targets are class names, not numbers."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type)


def class_names(column: pa.ChunkedArray) -> list[str]:
    """A string label column's classes in sorted order: class k is the k-th name."""
    return sorted(str(v) for v in column.unique().to_pylist())


def encode_target(task: TaskSpec, column: pa.Array | pa.ChunkedArray, classes: list[str] | None) -> np.ndarray:
    """A target column as the model's labels: class indices (string labels: their place in
    `classes`; a name not among them is -1) or float32 regression values."""
    if classes is not None and is_label_column(column.type):
        index = {name: k for k, name in enumerate(classes)}
        return np.array([index.get(str(v), -1) for v in column.to_pylist()], dtype=np.int64)
    values = column.to_numpy(zero_copy_only=False)
    return values.astype(np.int64 if task.type == "classification" else np.float32)


def float_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64, a missing value (null or NaN) as NaN."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def labelled(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which rows have a label: a null (or NaN) target is an unlabelled row of that task, the
    usual shape of a table with several targets, each measured for some rows only."""
    present = pc.is_valid(column)
    if pa.types.is_floating(column.type):
        present = pc.and_kleene(present, pc.invert(pc.is_nan(column)))
    return pc.fill_null(present, False).to_numpy(zero_copy_only=False).astype(bool)


def table_to_task_data(task: TaskSpec, table: pa.Table, classes: list[str] | None = None) -> TaskData:
    """Splits a validated table into per-split numpy arrays of its labelled rows (a row with a
    null target is no row of this task's). String labels become class indices in sorted order,
    or in the order of `classes` (a trained model's) when given. A missing feature value stays
    NaN: `TaskPrep` fills it where the config asks (`data.impute`)."""
    features = feature_columns(task, table.schema)
    split = split_values(task, table)  # of every row: the seeded split does not move with the labels
    keep = labelled(table.column(task.target))
    table, split = table.filter(pa.array(keep)), split[keep]
    x_all = np.column_stack([float_values(table.column(c)).astype(np.float32) for c in features]) \
        if table.num_rows else np.zeros((0, len(features)), np.float32)
    target = table.column(task.target)
    classes = (classes or class_names(target)) if is_label_column(target.type) else None
    y_all = encode_target(task, target, classes)
    x = {s: x_all[split == s] for s in SPLITS}
    y = {s: y_all[split == s] for s in SPLITS}
    return TaskData(spec=task, features=features, x=x, y=y, classes=classes)


ROW_GROUP_ROWS = 1 << 16
"""Rows per Parquet row group written: a reader decodes a row group whole, so this bounds what
reading a task costs in memory (measured on 2M rows x 16 features, pyarrow's scanner: 150 MB
peak growth with 524,288-row groups, 37-89 MB with 65,536, depending on the allocator)."""


def write_suite(out_dir: str, chunks: Iterable[tuple[SuiteSpec, dict[str, pa.Table]]]) -> SuiteSpec:
    """Writes one Parquet file per task, chunk after chunk in row groups of `ROW_GROUP_ROWS` (so
    a suite of any size is written in the memory of one chunk), then `suite.yaml`. Returns the
    suite's spec."""
    writers: dict[str, pq.ParquetWriter] = {}
    spec = None
    try:
        for spec, tables in chunks:
            for task in spec.tasks:
                if task.name not in writers:
                    fs, inner = filesystem(join_path(out_dir, task.path))
                    fs.create_dir(os.path.dirname(inner), recursive=True)
                    writers[task.name] = pq.ParquetWriter(inner, tables[task.name].schema, filesystem=fs)
                writers[task.name].write_table(tables[task.name], row_group_size=ROW_GROUP_ROWS)
    finally:
        for writer in writers.values():
            writer.close()
    assert spec is not None, "a suite has at least one chunk"
    raw = spec.model_dump(exclude_none=True, exclude_defaults=False)
    for task in raw["tasks"]:  # a group column's options only where there is one
        if "group_column" not in task:
            task.pop("min_group_rows"), task.pop("small_groups")
    text = yaml.safe_dump(raw, sort_keys=False)
    write_text(suite_yaml_path(out_dir), text)
    return spec


class Partition:
    """Cuts tables that `tasks` share into each task's rows: every group task gets its group's
    rows in the table's order (a stable sort by group), an ungrouped task all rows. Made once for
    a pass over a table's batches: a batch holds a few of 10,000 groups, and each batch is cut by
    the groups it holds, not by every task (250,000 empty tables a pass before)."""

    def __init__(self, tasks: list[TaskSpec]):
        self.plain: list[TaskSpec] = []
        self.owners: dict[str, dict[object, list[TaskSpec]]] = {}  # group column -> value -> its one-group tasks
        self.pooled: dict[str, list[tuple[TaskSpec, tuple]]] = {}  # group column -> tasks of several groups
        for task in tasks:
            groups = task._groups
            if groups is None:
                self.plain.append(task)
            elif len(groups) == 1:
                self.owners.setdefault(task.group_column, {}).setdefault(groups[0], []).append(task)
            else:
                self.pooled.setdefault(task.group_column, []).append((task, groups))

    def __call__(self, table: pa.Table | pa.RecordBatch) -> Iterator[tuple[TaskSpec, pa.Table]]:
        """(task, its rows) of every task with rows in `table`."""
        for task in self.plain:
            yield task, table
        for column in dict.fromkeys([*self.owners, *self.pooled]):
            codes, dictionary = _codes(table.column(column))
            order, bounds = group_order(codes, len(dictionary))
            by_group = table.take(pa.array(order))  # one copy, sorted by group: a group's rows are a slice of it
            owners = self.owners.get(column, {})
            for code, value in enumerate(dictionary):
                for task in owners.get(value, ()):
                    yield task, by_group.slice(bounds[code], bounds[code + 1] - bounds[code])
            where = {value: code for code, value in enumerate(dictionary)}
            for task, groups in self.pooled.get(column, ()):
                picked = [order[bounds[where[v]] : bounds[where[v] + 1]] for v in groups if v in where]
                if picked:  # its rows in the table's order
                    yield task, table.take(pa.array(np.sort(np.concatenate(picked))))


def group_order(codes: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows sorted by group, stably: each group's rows in the table's order; where each group's
    rows start in that order, and the end): group k's rows are order[bounds[k]:bounds[k + 1]]."""
    order = np.argsort(codes, kind="stable")
    return order, np.searchsorted(codes[order], np.arange(groups + 1))


def by_table(tasks: list[TaskSpec]) -> list[list[TaskSpec]]:
    """The tasks read in one pass together: the groups of one entry (one table), every other task
    alone."""
    together: dict[str, list[TaskSpec]] = {}
    for task in tasks:
        together.setdefault(f"entry:{task.entry}" if task.grouped else f"task:{task.name}", []).append(task)
    return list(together.values())


def _codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Each row's group as an index into the list of distinct values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = decoded(column)
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()
