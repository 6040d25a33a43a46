"""The tasks a suite holds and their rows: `suite.yaml` read, each entry with a `group_column`
expanded into a task per distinct value, and tables read once and cut by task.

Users' tasks come as one table with a store, school or hospital column, not as a file per task.
Such an entry is expanded when the suite is read: every group value becomes a task named
`<entry>/<value>` (characters other than letters, digits, `_` and `-` become `_`), with the
entry's features, target and type, reading the rows that hold its value. Groups with fewer rows
than `min_group_rows` are counted and left out, or pooled into one task `<entry>/_pooled`
(`small_groups: pool`). Only the group column is read to expand an entry (and that once per
process and file version); loading and scanning read the table once and cut it by group
(`Partition`), never once per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from distributed_mtml.data.suite import (
    Partition,
    SuiteSpec,
    TaskData,
    TaskSpec,
    decoded,
    group_mask,
    join_path,
    read_file,
    read_text,
    suite_yaml_path,
    table_to_task_data,
)
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
    counts = pc.value_counts(decoded(values))
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


def load_suite_spec(suite_dir: str) -> SuiteSpec:
    """Reads `suite.yaml` with `yaml.safe_load` (pydantic's ValidationError on bad keys), with
    every entry that has a group column made into its groups' tasks (InputError if it cannot be)."""
    raw = yaml.safe_load(read_text(suite_yaml_path(suite_dir)))
    return expanded(suite_dir, SuiteSpec.model_validate(raw))


def read_table(suite_dir: str, task: TaskSpec) -> pa.Table:
    """A task's rows: its file's, or a group task's of its entry's table."""
    table = read_file(suite_dir, task)
    return table.filter(group_mask(task, table.column(task.group_column))) if task.grouped else table


def load_task(suite_dir: str, task: TaskSpec, classes: list[str] | None = None) -> TaskData:
    return table_to_task_data(task, read_table(suite_dir, task), classes)


def load_tasks(suite_dir: str, tasks: list[TaskSpec], classes: dict[str, list[str] | None]) -> dict[str, TaskData]:
    """Several tasks' data, each file read once: tasks that share a table (several targets of
    one file) take their columns from the same read."""
    by_path: dict[str, list[TaskSpec]] = {}
    for task in tasks:
        by_path.setdefault(join_path(suite_dir, task.path), []).append(task)
    out = {}
    for same_file in by_path.values():
        table = read_file(suite_dir, same_file[0])
        for task, rows in Partition(same_file)(table):
            out[task.name] = table_to_task_data(task, rows, classes.get(task.name))
        for task in same_file:  # a group the table does not hold: no rows
            if task.name not in out:
                out[task.name] = table_to_task_data(task, table.slice(0, 0), classes.get(task.name))
    return {t.name: out[t.name] for t in tasks}


