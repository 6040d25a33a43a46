"""One streamed pass over a task's Parquet data: everything the driver needs to know of it.

Validation, planning and `mtml data show` need facts about a task (its columns, rows per
split, the train split's mean and spread, its class names, what is wrong with it), never its
rows. So the driver reads the schema and row count from the Parquet footers and streams the
columns batch by batch; its memory is bounded by a batch, whatever the table's size. What is
*wrong* with the facts is `validate.py`'s business; this module only gathers them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from distributed_mtml.data.suite import (
    SPLITS,
    Partition,
    TaskSpec,
    feature_columns,
    filesystem,
    float_values,
    is_label_column,
    join_path,
    labelled,
    seeded_split,
)

SCAN_BATCH_ROWS = 65_536  # ~9 MB of float64 for 16 features: small next to any table worth streaming


class Moments:
    """Count, mean and sum of squared deviations of W columns, updated batch by batch with Chan
    et al.'s pairwise rule, so that the spread of 30M rows takes one pass and no sum of squares
    (which loses every digit when the mean is large next to the spread). A missing value (NaN)
    is skipped, so each column keeps its own count: a feature measured for some rows only has
    the moments of those rows (what `data.impute: mean` fills the others with)."""

    def __init__(self, width: int):
        self.n, self.mean, self.m2 = np.zeros(width), np.zeros(width), np.zeros(width)

    def add(self, values: np.ndarray) -> None:
        """`values` [N, W] (or [N] for one column)."""
        if len(values) == 0:  # a streamed batch without train rows
            return
        values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        present = ~np.isnan(values)
        batch = Moments(values.shape[1])
        batch.n = present.sum(axis=0).astype(np.float64)
        batch.mean = np.where(present, values, 0).sum(axis=0) / np.maximum(batch.n, 1)
        batch.m2 = np.where(present, (values - batch.mean) ** 2, 0).sum(axis=0)
        self.merge(batch)

    def merge(self, other: "Moments") -> "Moments":
        """Adds another set of rows' moments (the same rule as `add`): statistics pooled over
        tasks, or over streamed batches, without revisiting a row."""
        total = self.n + other.n
        share = np.divide(other.n, total, out=np.zeros_like(total), where=total > 0)
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + delta**2 * self.n * share
        self.mean = self.mean + delta * share
        self.n = total
        return self

    def column(self, i: int) -> "Moments":
        """Column `i`'s moments alone."""
        out = Moments(1)
        out.n, out.mean, out.m2 = self.n[i : i + 1].copy(), self.mean[i : i + 1].copy(), self.m2[i : i + 1].copy()
        return out

    def std(self) -> np.ndarray:
        """Population standard deviation, 1 for a constant column (a zero would divide by 0)."""
        std = np.sqrt(self.m2 / np.maximum(self.n, 1))
        return np.where(std > 1e-12, std, 1.0)


@dataclass
class TaskScan:
    """The facts of one task's data file."""

    task: TaskSpec
    where: str  # the file, as problems name it
    error: str | None = None  # the file cannot be read: the only fact there is
    columns: list[str] = field(default_factory=list)
    types: dict[str, pa.DataType] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    total_rows: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    labelled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # rows with a target
    unknown_splits: set = field(default_factory=set)
    non_finite: set[str] = field(default_factory=set)  # columns with infinite values
    missing: dict[str, int] = field(default_factory=dict)  # feature column -> labelled rows with NaN or null
    classes: set[str] | None = None  # string labels: every name seen
    bad_label: float | None = None  # numeric class labels: the first outside 0..num_classes-1
    x: Moments | None = None  # the train split's labelled rows' features
    y: Moments | None = None  # the train split's labels (regression)

    @property
    def seeded(self) -> bool:
        """No split column: rows are split by the suite's seed (`suite.seeded_split`)."""
        return self.task.split_column not in self.columns and self.task.split_is_optional()

    @property
    def string_labels(self) -> bool:
        return self.task.target in self.types and is_label_column(self.types[self.task.target])

    def class_names(self) -> list[str] | None:
        return sorted(self.classes) if self.classes is not None else None

    def usable_features(self) -> list[str]:
        return [c for c in self.features if c in self.types and is_numeric(self.types[c])]


def is_numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def open_parquet(path: str) -> pads.Dataset:
    """A Parquet file or directory (local, or any pyarrow filesystem URI) as a pyarrow dataset:
    footers read, no rows. FileNotFoundError for a local path that is not there."""
    fs, inner = filesystem(path)
    if isinstance(fs, pa.fs.LocalFileSystem) and not os.path.exists(inner):
        raise FileNotFoundError(inner)
    return pads.dataset(inner, filesystem=fs, format="parquet", partitioning="hive")


def open_task(suite_dir: str, task: TaskSpec) -> pads.Dataset:
    """The task's Parquet file or directory as a pyarrow dataset: footers read, no rows."""
    return open_parquet(join_path(suite_dir, task.path))


def read_batches(data: pads.Dataset, columns: list[str], batch_rows: int,
                 split: tuple[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """`columns` of the dataset's rows (with `split` = (column, value): those of that split),
    `batch_rows` at a time, file after file, one row group decoded at a time. Not the dataset's
    own scanner: whatever its readahead settings, it read ahead of a consumer slower than the
    disk (a scan's statistics, a model's forward); validating a directory of three 2M-row files
    peaked at 146-168 MB of Arrow memory per task with it, 48 MB this way. (With pre-buffering,
    a reader read ahead through the whole file: 794 MB for 6M rows of a 30M-row file.)"""
    read = columns if split is None or split[0] in columns else [*columns, split[0]]
    for fragment in data.get_fragments():
        keys = pads.get_partition_keys(fragment.partition_expression)  # Hive partition columns: not in the file
        with data.filesystem.open_input_file(fragment.path) as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            inside = [c for c in read if c not in keys or c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=inside):
                batch = _with_keys(batch, read, keys, data.schema)
                yield batch if split is None else batch.filter(pc.field(split[0]) == split[1]).select(columns)


def _with_keys(batch: pa.RecordBatch, columns: list[str], keys: dict, schema: pa.Schema) -> pa.RecordBatch:
    """A file's batch with its Hive partition values as constant columns, in `columns`' order."""
    if all(c in batch.schema.names for c in columns):
        return batch
    arrays = [batch.column(c) if c in batch.schema.names else
              pa.array([keys[c]] * batch.num_rows).cast(_plain(schema.field(c).type)) for c in columns]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _plain(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def head_rows(suite_dir: str, task: TaskSpec, columns: list[str], rows: int = 5) -> pa.Table:
    """The task's first `rows` rows of `columns`, as they are in its file (a model's input
    example): one batch from the first file's first row group. `Dataset.head` scans ahead through
    several row groups (measured: 345 MB for 5 rows of a 2M-row file; this, 105 MB with its
    524,288-row groups)."""
    data = open_task(suite_dir, task)
    first = next(read_batches(data, columns, rows), None)
    return pa.Table.from_batches([first]) if first is not None else data.schema.empty_table().select(columns)


def fingerprint(suite_dir: str, task: TaskSpec) -> str:
    """A digest of the task's files from their footers alone: each file's path, size and row
    count, and the schema. It changes when the data is rewritten, without reading the rows (a
    content hash of a 30M-row task would read GBs at the end of every run)."""
    data = open_task(suite_dir, task)
    h = hashlib.sha256(data.schema.to_string().encode())
    for fragment in data.get_fragments():
        size = data.filesystem.get_file_info(fragment.path).size
        h.update(f"{fragment.path}:{size}:{fragment.metadata.num_rows}".encode())
    return h.hexdigest()[:16]


def scan_task(suite_dir: str, task: TaskSpec, batch_rows: int = SCAN_BATCH_ROWS) -> TaskScan:
    """Streams the task's needed columns once (target, split, features) and returns its facts."""
    return scan_tasks(suite_dir, [task], batch_rows)[task.name]


def scan_tasks(suite_dir: str, tasks: list[TaskSpec], batch_rows: int = SCAN_BATCH_ROWS) -> dict[str, TaskScan]:
    """The facts of tasks that read one file (the groups of one entry, or one task), in one
    streamed pass: each batch is cut by group (`suite.Partition`) and each piece added to its
    task's facts, so a thousand groups cost one read of the table, not a thousand."""
    where = join_path(suite_dir, tasks[0].path)
    scans = {t.name: TaskScan(t, _where(where, t)) for t in tasks}
    try:
        data = open_task(suite_dir, tasks[0])
        total = data.count_rows()  # from the footers
    except FileNotFoundError:
        return {t.name: replace(scans[t.name], error=f"{where}: file not found (task '{t.name}')") for t in tasks}
    except (OSError, pa.ArrowException) as e:
        error = str(e).splitlines()[0]
        return {t.name: replace(scans[t.name], error=f"{where}: not a readable Parquet file (task '{t.name}'): {error}")
                for t in tasks}
    passes = {t.name: _Pass(scans[t.name], data.schema, total if t._rows is None else t._rows) for t in tasks}
    wanted = list(dict.fromkeys(c for p in passes.values() for c in p.columns))
    cut = Partition(tasks)
    for batch in read_batches(data, wanted, batch_rows):
        for task, rows in cut(batch):
            passes[task.name].add(rows)
    return scans


def _where(file: str, task: TaskSpec) -> str:
    """How problems name a task's data: its file, and its group when a group column made it."""
    return f"{file} (group '{task.name}')" if task.grouped else file


class _Pass:
    """One task's facts gathered batch by batch (`add`) during a streamed pass over its rows."""

    def __init__(self, scan: TaskScan, schema: pa.Schema, rows: int):
        task = scan.task
        self.scan, self.offset = scan, 0
        scan.total_rows = rows
        scan.columns, scan.types = schema.names, {f.name: f.type for f in schema}
        scan.features = feature_columns(task, schema)
        self.usable = scan.usable_features()
        self.target = task.target if task.target in scan.types else None
        self.split = task.split_column if task.split_column in scan.types else None
        if self.target is not None and not scan.string_labels and not is_numeric(scan.types[self.target]):
            self.target = None  # a non-numeric target: its type is the problem, not its values
        scan.x = Moments(len(self.usable))
        scan.y = Moments(1) if task.type == "regression" and self.target is not None else None
        scan.classes = set() if scan.string_labels else None
        self.seeded = seeded_split(task, rows) if scan.seeded else None
        group = [task.group_column] if task.grouped else []
        self.columns = list(dict.fromkeys([*self.usable, *(c for c in (self.target, self.split) if c), *group]))

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        scan, target = self.scan, self.target
        splits = pa.array(self.seeded[self.offset : self.offset + batch.num_rows]) if self.seeded is not None else (
            _array(batch.column(self.split)) if self.split else None)
        self.offset += batch.num_rows
        has_label = labelled(batch.column(target)) if target else np.ones(batch.num_rows, dtype=bool)
        train = _count_splits(scan, splits, has_label)[has_label] if splits is not None else None
        rows = batch.filter(pa.array(has_label))  # the task's rows: the labelled ones
        if target is not None:
            _add_target(scan, _array(rows.column(target)), train)
        _add_features(scan, rows, self.usable, train)


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _count_splits(scan: TaskScan, splits: pa.Array, has_label: np.ndarray) -> np.ndarray:
    """Adds the batch's rows, and its labelled rows, per split; returns which rows are train."""
    if pa.types.is_dictionary(splits.type):
        splits = splits.dictionary_decode()
    for counted, rows in ((scan.rows, splits), (scan.labelled, splits.filter(pa.array(has_label)))):
        counts = pc.value_counts(rows)
        for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            if value in counted:
                counted[value] += count
            else:
                scan.unknown_splits.add(value)
    if not is_label_column(splits.type):
        return np.zeros(len(splits), dtype=bool)
    return pc.fill_null(pc.equal(splits, "train"), False).to_numpy(zero_copy_only=False)


def _add_features(scan: TaskScan, batch: pa.RecordBatch, usable: list[str], train: np.ndarray | None) -> None:
    """Notes the features with missing or infinite values (of labelled rows), and adds the train
    rows to their moments (a missing value skipped)."""
    x = np.column_stack([float_values(batch.column(c)) for c in usable]) if usable else None
    for i, c in enumerate(usable):
        gaps = int(np.isnan(x[:, i]).sum())
        if gaps:
            scan.missing[c] = scan.missing.get(c, 0) + gaps
        if np.isinf(x[:, i]).any():
            scan.non_finite.add(c)
    if x is not None and train is not None and train.any() and not scan.non_finite & set(usable):
        scan.x.add(x[train].astype(np.float32))  # what the model is given, as `suite.load_task` makes it


def _add_target(scan: TaskScan, column: pa.Array, train: np.ndarray | None) -> None:
    """Adds the labelled rows' target (`column` holds no unlabelled row): class names, a label
    out of range, infinite values, the train split's moments."""
    task = scan.task
    if scan.classes is not None:
        scan.classes.update(str(v) for v in pc.unique(column).to_pylist())
        return
    values = float_values(column)
    if np.isinf(values).any():
        scan.non_finite.add(task.target)
        return
    if task.type == "classification" and task.num_classes is not None and scan.bad_label is None:
        bad = values[(values < 0) | (values >= task.num_classes) | (values != np.round(values))]
        if bad.size:
            scan.bad_label = float(bad[0])
    if scan.y is not None and train is not None:
        scan.y.add(values[train].astype(np.float32))
