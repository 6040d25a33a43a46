"""The driver's preparation of `mtml meta-train`: where episodes come from, checked before Ray.

A config whose suite names a procedural family (`suite.generator: sinusoid`) and no path
samples tasks on the fly; otherwise the suite's tasks (made first if a generator is named)
are sharded over the workers. A shared head needs every task to agree on type, feature count
and classes, and every episode needs `shots + query` rows: both are checked here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from distributed_mtml.config import Config
from distributed_mtml.data.validate import checked_scans
from distributed_mtml.errors import InputError
from distributed_mtml.meta.algorithms import ALGORITHMS, META_TASK
from distributed_mtml.meta.tasks import FAMILIES
from distributed_mtml.models import TaskShape
from distributed_mtml.runtime.monitor import check_monitor
from distributed_mtml.runtime.placement import place_tasks
from distributed_mtml.data.locate import ensure_suite


class MetaPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Config
    source: Literal["family", "suite"]
    name: str  # the family or the suite's name
    suite_dir: str | None = None
    task: dict  # the TaskShape of the shared head
    suite_tasks: list[str] = []  # the suite's tasks in order; empty for a family
    features: list[str] = []  # the feature columns a task's rows have (empty in older plans)

    @model_validator(mode="before")
    @classmethod
    def _shards_of_older_plans(cls, raw: dict) -> dict:
        """Plans saved before elastic training held fixed shards; the tasks are what is kept."""
        if not isinstance(raw, dict) or "shards" not in raw:
            return raw
        shards = raw["shards"]  # round-robin: task i was on rank i mod W
        tasks = [s[i] for i in range(max(map(len, shards), default=0)) for s in shards if i < len(s)]
        return {"suite_tasks": tasks, **{k: v for k, v in raw.items() if k != "shards"}}

    def shape(self) -> TaskShape:
        return TaskShape(**self.task)

    def shards(self, world: int) -> list[list[str]]:
        """The suite's tasks per rank in a group of `world` (none for a family): derived at every
        (re)start, so an elastic run moves them with its worker count."""
        return place_tasks(self.suite_tasks, world) if self.suite_tasks else [[] for _ in range(world)]

    def holds(self, rank: int, world: int) -> list[str]:
        """What rank works on, for the run's placement record: its tasks, or its share of a
        family's meta-batch."""
        count = self.config.meta.meta_batch_size
        return self.shards(world)[rank] or [f"{share(count, world, rank)} of {count} episodes per meta-batch"]

    def episodes_of(self, rank: int, world: int, count: int, first: int = 0) -> list[tuple[int, str | None]]:
        """[(episode index, task)] that rank computes of a meta-batch of `count` episodes.
        A family's batch is split in contiguous shares; a suite's episode j takes task
        (first + j) mod T, cycling through the tasks, and is computed by the task's owner."""
        if not self.suite_tasks:
            start = sum(share(count, world, r) for r in range(rank))
            return [(j, None) for j in range(start, start + share(count, world, rank))]
        mine = set(self.shards(world)[rank])
        tasks = [self.suite_tasks[(first + j) % len(self.suite_tasks)] for j in range(count)]
        return [(j, task) for j, task in enumerate(tasks) if task in mine]


def share(total: int, world: int, rank: int) -> int:
    """Rank `rank`'s part of `total` items split as evenly as possible."""
    return total // world + (rank < total % world)


def _suite_shape(config: Config, suite_dir: str) -> tuple[str, TaskShape, list[str], list[str]]:
    spec, scans = checked_scans(suite_dir, config.data.impute == "mean")
    need = config.meta.shots + config.meta.query_size()
    kinds = set()
    for task in spec.tasks:
        shape = TaskShape.of_scan(scans[task.name])
        kinds.add((task.type, shape.num_features, shape.num_classes))
        if scans[task.name].labelled["train"] < need:
            raise InputError(
                f"{suite_dir}/{task.path}: split 'train' has {scans[task.name].labelled['train']} labelled rows; "
                f"meta.shots + query needs {need} per episode"
            )
    if len(kinds) > 1:
        raise InputError(f"{suite_dir}/suite.yaml: meta-learning needs tasks of one type, feature count and class "
                         f"count (one shared head); found {sorted(kinds, key=str)}")
    kind, features, classes = kinds.pop()
    columns = scans[spec.tasks[0].name].features  # what a new task's rows are read by
    return spec.name, TaskShape(META_TASK, kind, features, classes), [t.name for t in spec.tasks], columns


def make_meta_plan(config: Config) -> MetaPlan:
    meta, workers = config.meta, config.scaling.max_workers
    if meta.algorithm not in ALGORITHMS:
        raise InputError(f"key 'meta.algorithm': unknown '{meta.algorithm}' (choose from: {', '.join(ALGORITHMS)})")
    check_monitor(config, ["val/mean_loss", f"val/{META_TASK}/loss"])  # the query loss after adaptation
    if meta.meta_batch_size < workers:
        raise InputError(f"meta.meta_batch_size ({meta.meta_batch_size}) must be at least scaling.num_workers ({workers})")
    family = config.suite.generator if config.suite is not None and config.suite.path is None else None
    if family in FAMILIES:
        if config.suite.options:
            raise InputError(f"suite.options: the '{family}' family is sampled on the fly and takes no options")
        shape = TaskShape(META_TASK, "regression", FAMILIES[family].num_features)
        return MetaPlan(config=config, source="family", name=family, task=shape.to_dict(),
                        features=FAMILIES[family].columns)
    suite_dir = ensure_suite(config)
    name, shape, tasks, columns = _suite_shape(config, suite_dir)
    if len(tasks) < workers:
        raise InputError(f"{suite_dir}: {len(tasks)} tasks cannot be sharded over {workers} workers (scaling.num_workers)")
    return MetaPlan(config=config, source="suite", name=name, suite_dir=suite_dir, task=shape.to_dict(),
                    suite_tasks=tasks, features=columns)
