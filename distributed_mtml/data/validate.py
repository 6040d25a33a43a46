"""Checks a task suite and reports every problem at once, one line each.

A user fixing a suite wants the whole list in one go, not one error per run, and each line
must name the file and the key or column at fault so it can be fixed without guessing.
"""

from __future__ import annotations

import yaml
from pydantic import ValidationError

from distributed_mtml import compat
from distributed_mtml.data.scan import TaskScan, is_numeric, scan_tasks
from distributed_mtml.data.suite import SPLITS, SuiteSpec, TaskSpec, by_table, read_text, suite_yaml_path
from distributed_mtml.data.tasks import expanded
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
    if problems:
        return spec, problems
    try:
        return expanded(suite_dir, spec), []
    except InputError as e:
        return None, e.problems


def _column_problems(scan: TaskScan, impute: bool) -> list[str]:
    """`impute`: missing feature values will be filled (`data.impute: mean`), so not a problem."""
    where, task, problems = scan.where, scan.task, []
    if task.target not in scan.types:
        problems.append(f"{where}: target column '{task.target}' not found")
    if task.split_column not in scan.types and not task.split_is_optional():
        problems.append(f"{where}: split column '{task.split_column}' not found")
    if not scan.features:
        problems.append(f"{where}: no numeric feature columns")
    for col in scan.features:
        if col not in scan.types:
            problems.append(f"{where}: feature column '{col}' not found")
        elif col not in scan.usable_features():
            problems.append(f"{where}: feature column '{col}' is not numeric (type {scan.types[col]})")
        elif col in scan.non_finite:
            problems.append(f"{where}: feature column '{col}' has infinite values")
        elif col in scan.missing and not impute:
            problems.append(f"{where}: feature column '{col}' has {scan.missing[col]} missing (NaN or null) value(s) "
                            f"in task '{task.name}'s labelled rows; fill them, or set data.impute: mean")
    return problems


def _label_problems(scan: TaskScan) -> list[str]:
    """String class labels: classes are the distinct names, so there must be two or more and,
    when `num_classes` is given, exactly that many."""
    where, task = scan.where, scan.task
    names = scan.class_names()
    if len(names) < 2:
        return [f"{where}: target column '{task.target}' has one class ({names[0] if names else 'none'}); "
                "classification needs two or more"]
    if task.num_classes is not None and task.num_classes != len(names):
        return [f"{where}: target column '{task.target}' has {len(names)} class names, num_classes says {task.num_classes}"]
    return []


def _target_problems(scan: TaskScan, key: str) -> list[str]:
    """`key`: where the task sits in suite.yaml ("<file>: key 'tasks.<i>"), for what must be fixed there."""
    where, task = scan.where, scan.task
    if task.target not in scan.types:
        return []
    typ = scan.types[task.target]
    if task.type == "classification" and scan.string_labels:
        return _label_problems(scan)
    if scan.string_labels or not is_numeric(typ):
        return [f"{where}: target column '{task.target}' is not numeric (type {typ})"]
    if task.target in scan.non_finite:
        return [f"{where}: target column '{task.target}' has infinite values"]
    if task.type != "classification":
        return []
    if task.num_classes is None:
        return [f"{key}.num_classes': required for classification task '{task.name}' "
                "with numeric labels (string labels need none)"]
    if scan.bad_label is not None:
        return [f"{where}: target column '{task.target}' has label {scan.bad_label:g} outside 0..{task.num_classes - 1}"]
    return []


def _split_problems(scan: TaskScan) -> list[str]:
    where, task = scan.where, scan.task
    if task.split_column not in scan.types and not task.split_is_optional():
        return []
    source = (f"split column '{task.split_column}'" if not scan.seeded else
              f"no split column; split_fractions {list(task._seeded_split[0])} of {scan.total_rows} rows")
    problems = [f"{where}: {source}: split '{s}' is empty" for s, n in scan.rows.items() if n == 0]
    if task.target in scan.types and scan.total_rows and not any(scan.labelled.values()):
        return problems + [f"{where}: task '{task.name}' has no labelled rows (target column '{task.target}' is null "
                           f"in all {scan.total_rows})"]
    problems += [f"{where}: task '{task.name}' has no labelled rows in split '{s}' (target column '{task.target}' is "
                 f"null in all {n})" for s, n in scan.rows.items() if n and not scan.labelled[s] and task.target in scan.types]
    if scan.unknown_splits:
        problems.append(
            f"{where}: split column '{task.split_column}' has values {sorted(map(str, scan.unknown_splits))} "
            f"(allowed: {', '.join(SPLITS)})"
        )
    return problems


def scan_problems(scan: TaskScan, suite_dir: str, key: str = "tasks", impute: bool = False) -> list[str]:
    """Every problem of one task's data file; `key` is the task's place in suite.yaml."""
    if scan.error is not None:
        return [scan.error]
    return (
        _column_problems(scan, impute)
        + _target_problems(scan, f"{suite_yaml_path(suite_dir)}: key '{key}")
        + _split_problems(scan)
    )


def _shared_target_problems(scans: dict[str, TaskScan]) -> list[str]:
    """Tasks that read one column of one file as their target must agree on what it is: a
    column is class labels or a quantity, not both."""
    kinds: dict[tuple[str, str], dict[str, str]] = {}
    for name, scan in scans.items():
        if scan.error is None and scan.task.target in scan.types:
            kinds.setdefault((scan.where, scan.task.target), {})[name] = scan.task.type
    return [f"{where}: target column '{target}' is read by tasks of different types ("
            + ", ".join(f"'{n}' {t}" for n, t in tasks.items()) + "); one column is one kind of label"
            for (where, target), tasks in kinds.items() if len(set(tasks.values())) > 1]


def scan_suite(suite_dir: str, on_cluster: bool = False,
               impute: bool = False) -> tuple[SuiteSpec | None, dict[str, TaskScan], list[str]]:
    """The suite's spec, each task's facts, and every problem (one streamed pass per task). With
    `on_cluster`, each task's pass is a Ray task on the Ray this process has joined, all at
    once. `impute`: missing feature values will be filled (`data.impute: mean`)."""
    spec, problems = read_spec(suite_dir)
    if spec is None:
        return None, {}, problems
    files = by_table(spec.tasks)
    scanned = _scan_on_cluster(suite_dir, files) if on_cluster else [scan_tasks(suite_dir, tasks) for tasks in files]
    found = {name: scan for scans in scanned for name, scan in scans.items()}
    scans, entries = {}, {}
    for task in spec.tasks:
        scans[task.name] = found[task.name]
        index = list(entries).index(task.entry) if task.entry in entries else len(entries)  # its place in suite.yaml
        lines = scan_problems(found[task.name], suite_dir, f"tasks.{index}", impute)
        entries.setdefault(task.entry, []).extend(lines)
    problems += [line for lines in entries.values() for line in _fewer(lines)]
    return spec, scans, problems + _shared_target_problems(scans)


GROUP_PROBLEM_LINES = 10  # an entry's problems printed before the rest are counted: a thousand groups' are read by nobody


def _fewer(lines: list[str]) -> list[str]:
    if len(lines) <= GROUP_PROBLEM_LINES:
        return lines
    return [*lines[:GROUP_PROBLEM_LINES], f"... and {len(lines) - GROUP_PROBLEM_LINES} more problems like these "
            "(a group column's small groups: set min_group_rows, or small_groups: pool)"]


def _scan_on_cluster(suite_dir: str, files: list[list[TaskSpec]]) -> list[dict[str, TaskScan]]:
    """Each file's scan as a Ray task (one CPU each), in the suite's order: a suite of many
    files in a bucket is read by the cluster's cores at once, not by this process one by one.
    Every node must reach `suite_dir` (a bucket URI or a shared path). The caller has joined
    the cluster (`runtime.cluster.ensure_ray`)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("scanning on a cluster needs a joined Ray (runtime.cluster.ensure_ray)")
    remote = ray.remote(num_cpus=1)(_scan_where).options(runtime_env={"env_vars": compat.system_arrow_pool()})
    done = ray.get([remote.remote(suite_dir, tasks) for tasks in files])
    nodes = {node for _, node in done}
    print(f"[mtml] scanned {len(done)} task file(s) as Ray tasks on {len(nodes)} node(s)", flush=True)
    return [scans for scans, _ in done]


def _scan_where(suite_dir: str, tasks: list[TaskSpec]) -> tuple[dict[str, TaskScan], str]:
    """`scan_tasks` in a Ray task, with the node that ran it."""
    import ray

    return scan_tasks(suite_dir, tasks), ray.get_runtime_context().get_node_id()


def validate_suite(suite_dir: str, on_cluster: bool = False, impute: bool = False) -> list[str]:
    """All problems of a suite; an empty list means it is ready to train on."""
    return scan_suite(suite_dir, on_cluster, impute)[2]


def checked_scans(suite_dir: str, impute: bool = False) -> tuple[SuiteSpec, dict[str, TaskScan]]:
    """The suite's spec and each task's facts, or an InputError listing every problem."""
    spec, scans, problems = scan_suite(suite_dir, impute=impute)
    compat.give_back()  # the scan read every row: its freed buffers are not this process's to keep
    if problems:
        raise InputError(problems)
    assert spec is not None
    return spec, scans


def checked_suite(suite_dir: str, impute: bool = False) -> SuiteSpec:
    """The suite's spec, or an InputError listing every problem."""
    return checked_scans(suite_dir, impute)[0]
