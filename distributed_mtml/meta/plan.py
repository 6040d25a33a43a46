"""The driver's preparation of `mtml meta-train`: where episodes come from, checked before Ray.

A config whose suite names a procedural family (`suite.generator: sinusoid`) and no path
samples tasks on the fly; otherwise the suite's tasks (made first if a generator is named)
are sharded over the workers. A shared head needs every task to agree on type, feature count
and classes, and every episode needs `shots + query` rows: both are checked here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

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
    shards: list[list[str]]  # suite tasks per rank; empty for a family

    def shape(self) -> TaskShape:
        return TaskShape(**self.task)


def share(total: int, world: int, rank: int) -> int:
    """Rank `rank`'s part of `total` items split as evenly as possible."""
    return total // world + (rank < total % world)


def _suite_shape(config: Config, suite_dir: str) -> tuple[str, TaskShape, list[str]]:
    spec, scans = checked_scans(suite_dir)
    need = config.meta.shots + config.meta.query_size()
    kinds = set()
    for task in spec.tasks:
        shape = TaskShape.of_scan(scans[task.name])
        kinds.add((task.type, shape.num_features, shape.num_classes))
        if scans[task.name].rows["train"] < need:
            raise InputError(
                f"{suite_dir}/{task.path}: split 'train' has {scans[task.name].rows['train']} rows; "
                f"meta.shots + query needs {need} per episode"
            )
    if len(kinds) > 1:
        raise InputError(f"{suite_dir}/suite.yaml: meta-learning needs tasks of one type, feature count and class "
                         f"count (one shared head); found {sorted(kinds, key=str)}")
    kind, features, classes = kinds.pop()
    return spec.name, TaskShape(META_TASK, kind, features, classes), [t.name for t in spec.tasks]


def make_meta_plan(config: Config) -> MetaPlan:
    meta, workers = config.meta, config.scaling.num_workers
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
        return MetaPlan(config=config, source="family", name=family, task=shape.to_dict(), shards=[[]] * workers)
    suite_dir = ensure_suite(config)
    name, shape, tasks = _suite_shape(config, suite_dir)
    if len(tasks) < workers:
        raise InputError(f"{suite_dir}: {len(tasks)} tasks cannot be sharded over scaling.num_workers={workers}")
    return MetaPlan(config=config, source="suite", name=name, suite_dir=suite_dir, task=shape.to_dict(),
                    shards=place_tasks(tasks, workers))
