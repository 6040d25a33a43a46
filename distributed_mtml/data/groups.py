"""One table, many tasks: a suite entry with a `group_column` is a task per distinct value.

Users' tasks come as one table with a store, school or hospital column, not as a file per task.
Such an entry is expanded when the suite is read: every group value becomes a task named
`<entry>/<value>` (characters other than letters, digits, `_` and `-` become `_`), with the
entry's features, target and type, reading the rows that hold its value. Groups with fewer rows
than `min_group_rows` are counted and left out, or pooled into one task `<entry>/_pooled`
(`small_groups: pool`). Only the group column is read to expand an entry (and that once per
process and file version); loading and scanning read the table once and cut it by group
(`partition`), never once per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_mtml.data.suite import SuiteSpec, TaskSpec, join_path
from distributed_mtml.errors import InputError

POOLED = "_pooled"
SUMMARY_ABOVE = 20
"""`mtml data show` prints an entry's groups as one summary line above this many (a table of a
thousand lines is read by nobody)."""


@dataclass
class GroupSummary:
    """What expanding one entry made: its tasks' rows, and the small groups left out or pooled."""

    entry: str
    column: str
    rows: list[int] = field(default_factory=list)  # rows per task made, in task order
    small: int = 0  # groups under min_group_rows
    small_rows: int = 0
    pooled: bool = False  # ... pooled into one task rather than left out

    def line(self) -> str:
        """One line: the group count and rows per group (min, median, max), and the small groups."""
        rows = np.array(self.rows or [0])
        text = (f"entry '{self.entry}': {len(self.rows)} tasks from group column '{self.column}', rows per task "
                f"min {rows.min()} / median {np.median(rows):g} / max {rows.max()}")
        if self.small:
            fate = f"pooled into '{self.entry}/{POOLED}'" if self.pooled else "left out"
            text += f"; {self.small} groups under min_group_rows ({self.small_rows} rows) {fate}"
        return text


def task_name(entry: str, value: object) -> str:
    """The task a group value makes: names travel into metric keys, file names and module names,
    so only letters, digits, `_` and `-` are kept from the value."""
    return f"{entry}/{re.sub(r'[^A-Za-z0-9_-]', '_', str(value))}"


def _where(suite_dir: str, entry: TaskSpec) -> str:
    return join_path(suite_dir, entry.path)


def group_counts(suite_dir: str, entry: TaskSpec) -> dict:
    """Rows per group value of the entry's table, in sorted value order; InputError naming the
    file and the column when the table cannot be read, lacks the column or has a null in it."""
    from distributed_mtml.data.scan import fingerprint

    where = _where(suite_dir, entry)
    try:
        version = fingerprint(suite_dir, entry)
    except FileNotFoundError:
        raise InputError(f"{where}: file not found (entry '{entry.name}')") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{where}: not a readable Parquet file (entry '{entry.name}'): {str(e).splitlines()[0]}") from None
    return dict(_counts(where, entry.group_column, entry.name, version))


@lru_cache(maxsize=64)
def _counts(where: str, column: str, entry: str, version: str) -> tuple:
    """(value, rows) pairs of one file version's group column: every command and worker expands
    the suite, and each reads the column once."""
    from distributed_mtml.data.scan import open_parquet

    data = open_parquet(where)
    if column not in data.schema.names:
        raise InputError(f"{where}: group column '{column}' not found (entry '{entry}')")
    values = data.to_table(columns=[column]).column(column)
    nulls = values.null_count
    if nulls:
        raise InputError(f"{where}: group column '{column}' has {nulls} null value(s); every row needs a group "
                         f"(entry '{entry}')")
    counts = pc.value_counts(values.cast(values.type.value_type) if pa.types.is_dictionary(values.type) else values)
    pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
    return tuple(sorted(pairs, key=lambda pair: (str(type(pair[0])), pair[0])))


def _group_task(entry: TaskSpec, name: str, values: tuple, rows: int) -> TaskSpec:
    task = entry.model_copy(update={"name": name})
    task._groups, task._entry, task._rows = values, entry.name, rows
    return task


def expand_entry(suite_dir: str, entry: TaskSpec) -> tuple[list[TaskSpec], GroupSummary]:
    """The tasks of one grouped entry (InputError as `group_counts`, or when two values make one name)."""
    counts = group_counts(suite_dir, entry)
    summary = GroupSummary(entry.name, entry.group_column, pooled=entry.small_groups == "pool")
    tasks, small, names = [], [], {}
    for value, rows in counts.items():
        if rows < entry.min_group_rows:
            small.append(value)
            summary.small, summary.small_rows = summary.small + 1, summary.small_rows + rows
            continue
        name = task_name(entry.name, value)
        if name in names:
            raise InputError(f"{_where(suite_dir, entry)}: group values {names[name]!r} and {value!r} of column "
                             f"'{entry.group_column}' both make task '{name}'")
        names[name] = value
        tasks.append(_group_task(entry, name, (value,), rows))
        summary.rows.append(rows)
    if small and summary.pooled:
        tasks.append(_group_task(entry, f"{entry.name}/{POOLED}", tuple(small), summary.small_rows))
        summary.rows.append(summary.small_rows)
    if not tasks:
        raise InputError(f"{_where(suite_dir, entry)}: no group of column '{entry.group_column}' has min_group_rows "
                         f"{entry.min_group_rows} rows (entry '{entry.name}')")
    return tasks, summary


def expanded(suite_dir: str, spec: SuiteSpec) -> SuiteSpec:
    """The suite with every grouped entry replaced by its groups' tasks (`group_summaries` says
    what each made); InputError listing every entry that cannot be expanded."""
    tasks, summaries, problems = [], {}, []
    for entry in spec.tasks:
        if entry.group_column is None:
            tasks.append(entry)
            continue
        try:
            made, summaries[entry.name] = expand_entry(suite_dir, entry)
            tasks += made
        except InputError as e:
            problems += e.problems
    if problems:
        raise InputError(problems)
    if not summaries:
        return spec
    out = spec.model_copy(update={"tasks": tasks})
    out._group_summaries = summaries
    return out


def group_summaries(spec: SuiteSpec) -> dict[str, GroupSummary]:
    return spec._group_summaries


def partition(tasks: list[TaskSpec], table: pa.Table | pa.RecordBatch) -> Iterator[tuple[TaskSpec, pa.Table]]:
    """Each task's rows of one table its tasks share, the table cut once: every group task gets
    its group's rows in the table's order (a stable sort by group), an ungrouped task all rows."""
    grouped = [t for t in tasks if t.grouped]
    for task in tasks:
        if not task.grouped:
            yield task, table
    by_column: dict[str, list[TaskSpec]] = {}
    for task in grouped:
        by_column.setdefault(task.group_column, []).append(task)
    for column, same in by_column.items():
        codes, dictionary = _codes(table.column(column))
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(dictionary) + 1))
        where = {value: code for code, value in enumerate(dictionary)}
        for task in same:
            picked = [order[bounds[where[v]] : bounds[where[v] + 1]] for v in task._groups if v in where]
            rows = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
            yield task, table.take(pa.array(np.sort(rows) if len(picked) > 1 else rows))


def _codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Each row's group as an index into the list of distinct values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()
