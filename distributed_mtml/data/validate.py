"""Checks a task suite and reports every problem at once, one line each.

A user fixing a suite wants the whole list in one go, not one error per run, and each line
must name the file and the key or column at fault so it can be fixed without guessing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import yaml
from pydantic import ValidationError

from distributed_mtml.data.suite import (
    SPLITS,
    SuiteSpec,
    TaskSpec,
    class_names,
    feature_columns,
    is_label_column,
    join_path,
    read_table,
    read_text,
    split_values,
    suite_yaml_path,
)
from distributed_mtml.errors import InputError, validation_lines


def read_spec(suite_dir: str) -> tuple[SuiteSpec | None, list[str]]:
    """Parses `suite.yaml`, turning every way it can be wrong into a problem line."""
    where = suite_yaml_path(suite_dir)
    try:
        raw = yaml.safe_load(read_text(where))
    except FileNotFoundError:
        return None, [f"{where}: file not found"]
    except (OSError, yaml.YAMLError) as e:
        return None, [f"{where}: cannot read: {str(e).splitlines()[0]}"]
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping with 'name' and 'tasks'"]
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        return None, validation_lines(where, e)
    problems = []
    seen: set[str] = set()
    for i, task in enumerate(spec.tasks):
        if task.name in seen:
            problems.append(f"{where}: key 'tasks.{i}.name': duplicate task name '{task.name}'")
        seen.add(task.name)
    if not spec.tasks:
        problems.append(f"{where}: key 'tasks': the suite has no tasks")
    return spec, problems


def _column_problems(where: str, table: pa.Table, task: TaskSpec) -> list[str]:
    problems = []
    names = set(table.column_names)
    if task.target not in names:
        problems.append(f"{where}: target column '{task.target}' not found")
    if task.split_column not in names and not task.split_is_optional():
        problems.append(f"{where}: split column '{task.split_column}' not found")
    features = feature_columns(task, table.schema)
    if not features:
        problems.append(f"{where}: no numeric feature columns")
    for col in features:
        if col not in names:
            problems.append(f"{where}: feature column '{col}' not found")
            continue
        typ = table.schema.field(col).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
            problems.append(f"{where}: feature column '{col}' is not numeric (type {typ})")
            continue
        if _non_finite(table.column(col)):
            problems.append(f"{where}: feature column '{col}' has NaN, infinite or null values")
    return problems


def _non_finite(column: pa.ChunkedArray) -> bool:
    if column.null_count:
        return True
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return not np.isfinite(values).all()


def _label_problems(where: str, column: pa.ChunkedArray, task: TaskSpec) -> list[str]:
    """String class labels: classes are the distinct names, so there must be two or more and,
    when `num_classes` is given, exactly that many."""
    if column.null_count:
        return [f"{where}: target column '{task.target}' has null labels"]
    names = class_names(column)
    if len(names) < 2:
        return [f"{where}: target column '{task.target}' has one class ({names[0] if names else 'none'}); "
                "classification needs two or more"]
    if task.num_classes is not None and task.num_classes != len(names):
        return [f"{where}: target column '{task.target}' has {len(names)} class names, num_classes says {task.num_classes}"]
    return []


def _target_problems(where: str, table: pa.Table, task: TaskSpec, key: str) -> list[str]:
    """`key`: where the task sits in suite.yaml ("<file>: key 'tasks.<i>"), for what must be fixed there."""
    if task.target not in table.column_names:
        return []
    column = table.column(task.target)
    typ = column.type
    if task.type == "classification" and is_label_column(typ):
        return _label_problems(where, column, task)
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        return [f"{where}: target column '{task.target}' is not numeric (type {typ})"]
    if _non_finite(column):
        return [f"{where}: target column '{task.target}' has NaN, infinite or null values"]
    if task.type != "classification":
        return []
    if task.num_classes is None:
        return [f"{key}.num_classes': required for classification task '{task.name}' "
                "with numeric labels (string labels need none)"]
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = values[(values < 0) | (values >= task.num_classes) | (values != np.round(values))]
    if bad.size:
        return [
            f"{where}: target column '{task.target}' has label {bad[0]:g} outside 0..{task.num_classes - 1}"
        ]
    return []


def _split_problems(where: str, table: pa.Table, task: TaskSpec) -> list[str]:
    if task.split_column not in table.column_names and not task.split_is_optional():
        return []
    values = split_values(task, table).tolist()
    counts = {s: 0 for s in SPLITS}
    unknown = set()
    for v in values:
        if v in counts:
            counts[v] += 1
        else:
            unknown.add(v)
    source = (f"split column '{task.split_column}'" if task.split_column in table.column_names else
              f"no split column; split_fractions {list(task._seeded_split[0])} of {table.num_rows} rows")
    problems = [f"{where}: {source}: split '{s}' is empty" for s, n in counts.items() if n == 0]
    if unknown:
        problems.append(
            f"{where}: split column '{task.split_column}' has values {sorted(map(str, unknown))} "
            f"(allowed: {', '.join(SPLITS)})"
        )
    return problems


def task_problems(suite_dir: str, task: TaskSpec, key: str = "tasks") -> list[str]:
    """Every problem of one task's data file; `key` is the task's place in suite.yaml."""
    where = join_path(suite_dir, task.path)
    try:
        table = read_table(suite_dir, task)
    except FileNotFoundError:
        return [f"{where}: file not found (task '{task.name}')"]
    except (OSError, pa.ArrowException) as e:
        return [f"{where}: not a readable Parquet file (task '{task.name}'): {str(e).splitlines()[0]}"]
    return (
        _column_problems(where, table, task)
        + _target_problems(where, table, task, f"{suite_yaml_path(suite_dir)}: key '{key}")
        + _split_problems(where, table, task)
    )


def validate_suite(suite_dir: str) -> list[str]:
    """All problems of a suite; an empty list means it is ready to train on."""
    spec, problems = read_spec(suite_dir)
    if spec is None:
        return problems
    for i, task in enumerate(spec.tasks):
        problems += task_problems(suite_dir, task, f"tasks.{i}")
    return problems


def checked_suite(suite_dir: str) -> SuiteSpec:
    """The suite's spec, or an InputError listing every problem."""
    problems = validate_suite(suite_dir)
    if problems:
        raise InputError(problems)
    spec, _ = read_spec(suite_dir)
    assert spec is not None
    return spec
