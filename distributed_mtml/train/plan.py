"""The driver's preparation of a run: the suite checked, task shapes known, tasks placed.

Everything here happens before any Ray worker starts, so bad input fails fast with exit 2.
The resulting `TrainPlan` is the whole payload a worker receives; the worker re-validates it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, model_validator

from distributed_mtml import per_task
from distributed_mtml.architectures import ARCHITECTURES
from distributed_mtml.config import Config, config_of_older_plans
from distributed_mtml.console import say
from distributed_mtml.data.locate import ensure_suite
from distributed_mtml.data.prepare import TaskPrep, plan_preprocessing
from distributed_mtml.data.scan import TaskScan
from distributed_mtml.data.stream import train_megabytes
from distributed_mtml.data.suite import SuiteSpec
from distributed_mtml.data.validate import checked_scans
from distributed_mtml.errors import InputError
from distributed_mtml.models import TaskShape
from distributed_mtml.runtime.monitor import check_monitor, monitor_keys
from distributed_mtml.runtime.placement import place_tasks


class TrainPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Config
    suite_dir: str
    suite_name: str
    tasks: list[dict]  # TaskShape fields
    train_rows: dict[str, int]
    steps_per_epoch: int
    streamed: list[str] = []  # tasks above data.max_in_memory_mb: read with Ray Data, not loaded
    preprocessing: dict[str, TaskPrep] = {}  # per task; empty in checkpoints older than data.standardize
    features: dict[str, list[str]] = {}  # per task, its feature columns in order; empty in older plans
    groups: dict[str, dict] = {}  # entry with a group column -> {"column": it, "tasks": {str(value): task}}

    @model_validator(mode="before")
    @classmethod
    def _older_plans(cls, raw: dict) -> dict:
        """Plans saved before elastic training held their placement (it is derived now); the
        model of plans saved under older defaults (`config_of_older_plans`)."""
        if not isinstance(raw, dict):
            return raw
        return {k: config_of_older_plans(v) if k == "config" else v for k, v in raw.items() if k != "placement"}

    def task_shapes(self) -> list[TaskShape]:
        return [TaskShape(**t) for t in self.tasks]

    def folds_task_metrics(self) -> bool:
        """Whether the run logs its per-task metrics as summaries and tables (`per_task.folds`)."""
        weighted = self.config.aggregation.resolved().needs_exchange
        learned = ARCHITECTURES[self.config.model.architecture].relation_keys(self.config.model, len(self.tasks))
        keys = sum(per_task.keys_of(t.type, weighted) + learned for t in self.task_shapes())
        return per_task.folds(len(self.tasks), keys, self.config.tracking.task_metrics_limit)

    def placement(self, world: int) -> list[list[str]]:
        """Which rank owns which tasks in a group of `world` workers: derived again at every
        (re)start, so that an elastic run moves tasks with its worker count."""
        return place_tasks([t["name"] for t in self.tasks], world)

    def prep(self, task: str) -> TaskPrep:
        """The task's preprocessing (none recorded: inputs used as they are)."""
        return self.preprocessing.get(task) or TaskPrep()


def make_plan(config: Config) -> TrainPlan:
    suite_dir = ensure_suite(config)
    impute = config.data.impute == "mean"
    spec, scans = checked_scans(suite_dir, impute)  # one streamed pass per task: no table is held
    shapes = [TaskShape.of_scan(scans[t.name]) for t in spec.tasks]
    train_rows = {t.name: scans[t.name].labelled["train"] for t in spec.tasks}
    chosen = config.scaling.resolve_auto(sum(train_rows.values()))
    if chosen:
        say(chosen)
    preps = plan_preprocessing({t.name: scans[t.name] for t in spec.tasks}, config.data.standardize, impute)
    streamed = _streamed_tasks(config, spec, scans)
    _say_unlabelled(scans)
    check_monitor(config, monitor_keys(shapes))
    _warn_if_representation_is_too_narrow(config, len(shapes))
    _check_relations_fit(config, len(shapes))
    _check_architecture_fits(config, len(shapes))
    place_tasks([t.name for t in spec.tasks], config.scaling.max_workers)  # every worker must own a task
    steps = config.training.steps_per_epoch or math.ceil(max(train_rows.values()) / config.training.batch_size)
    return TrainPlan(
        config=config,
        suite_dir=suite_dir,
        suite_name=spec.name,
        tasks=[s.to_dict() for s in shapes],
        train_rows=train_rows,
        steps_per_epoch=steps,
        preprocessing=preps,
        features={t.name: scans[t.name].features for t in spec.tasks},
        streamed=streamed,
        groups=group_routes(spec.tasks),
    )


def group_routes(tasks: list) -> dict[str, dict]:
    """Which task each group value is, per grouped entry: how `predict` routes a row by its group
    column (values as text, as a table's cell prints)."""
    routes: dict[str, dict] = {}
    for task in tasks:
        if task.grouped:
            route = routes.setdefault(task.entry, {"column": task.group_column, "tasks": {}})
            route["tasks"].update({str(value): task.name for value in task._groups})
    return routes


UNLABELLED_LINES = 10  # tasks named one line each; a group column's thousand are counted


def _say_unlabelled(scans: dict[str, TaskScan]) -> None:
    """One line per task with unlabelled rows: they are left out, and the user should know how many."""
    said = 0
    for name, scan in scans.items():
        total, labelled = sum(scan.rows.values()), sum(scan.labelled.values())
        if labelled < total and said < UNLABELLED_LINES:
            per_split = ", ".join(f"{s} {scan.labelled[s]}" for s in scan.rows)
            say(f"[mtml] task '{name}': {total - labelled} of {total} rows have no label ('{scan.task.target}' is null) "
                f"and are left out; labelled rows: {per_split}")
        said += labelled < total
    if said > UNLABELLED_LINES:
        say(f"[mtml] ... and {said - UNLABELLED_LINES} more tasks with unlabelled rows (`mtml data show` lists them)")


def _check_architecture_fits(config: Config, tasks: int) -> None:
    """An architecture with a part per task (cross_stitch: a column each) takes so many tasks."""
    most = ARCHITECTURES[config.model.architecture].max_tasks
    if most is not None and tasks > most:
        raise InputError(f"model.architecture: {config.model.architecture} takes at most {most} tasks (a column of the "
                         f"trunk each, every row through all of them); the suite has {tasks}")


def _check_relations_fit(config: Config, tasks: int) -> None:
    """The relation matrices are MLflow metrics, one per task pair (`relations/<kind>/<a>/<b>`):
    above `tracking.task_metrics_limit` tasks that is thousands of keys and a TAG search over
    groupings that does not finish, so it is refused before any worker starts."""
    limit = config.tracking.task_metrics_limit or per_task.PRINTED_TASKS
    if config.relations.enabled and tasks > limit:
        raise InputError(f"relations.enabled: {tasks} tasks would log {2 * tasks * tasks:,} relation metrics; task "
                         f"relations are measured for up to tracking.task_metrics_limit ({limit}) tasks (set "
                         "relations.enabled: false, or raise the limit)")


def _warn_if_representation_is_too_narrow(config: Config, tasks: int) -> None:
    """Representation gradients are trunk-output-wide vectors: with more tasks than that width
    they are linearly dependent, MGDA's min-norm point is then nearly always zero, and PCGrad
    projects most of each gradient away. Measured at 128 tasks (final val loss, 90 steps): a
    50-wide output 0.82 (mgda) and 0.93 (pcgrad) against mean's 0.61; a 256-wide one 0.64
    and 0.65. A warning, not an error: the run is valid, only likely to disappoint."""
    width = config.model.trunk.widths[-1]
    if config.aggregation.gradients == "representation" and tasks > width:
        say(f"[mtml] warning: aggregation.gradients: representation with {tasks} tasks and a trunk output of "
            f"{width} (model.trunk.widths[-1]): the tasks' representation gradients span at most {width} "
            "dimensions, which leaves the trunk little to learn from; make the trunk's last width larger "
            "than the task count, or use gradients: parameters")


def _streamed_tasks(config: Config, spec: SuiteSpec, scans: dict[str, TaskScan]) -> list[str]:
    """The tasks too large to load; each needs a split column, which Ray Data filters at the read
    (the seeded split of a table without one needs every row's position)."""
    streamed = []
    for task in spec.tasks:
        scan = scans[task.name]
        size = train_megabytes(scan.labelled["train"], len(scan.features))
        if size <= config.data.max_in_memory_mb:
            continue
        if scan.seeded:
            raise InputError(f"{scan.where}: task '{task.name}' is streamed (train split {size:.0f} MB as float32 > "
                             f"data.max_in_memory_mb {config.data.max_in_memory_mb:g}) and needs a split column "
                             f"'{task.split_column}' (train/val/test per row)")
        streamed.append(task.name)
    return streamed
