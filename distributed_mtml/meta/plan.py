"""The driver's preparation of `mtml meta-train`: where episodes come from, checked before Ray.

A config whose suite names a procedural family (`suite.generator: sinusoid`) and no path
samples tasks on the fly; otherwise the suite's tasks (made first if a generator is named)
are sharded over the workers. A shared head needs every task to agree on type, feature count
and classes, and every episode needs `shots + query` rows: a task with fewer labelled train
rows is left out (and counted); no task left is exit 2.

K shots mean K labels: under `data.standardize: suite` every task, in training and after it, is
transformed with the training suite's pooled train statistics, saved with the model (`prep`);
under `task`, each episode is standardised by its own K support rows, as `mtml predict
--adapt-from` standardises a new task by the rows it is given. No other label of a task reaches
the transform (before, each task was standardised by its whole train split, query rows among
them, so step 0 knew every new task's mean).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from distributed_mtml.architectures import ARCHITECTURES
from distributed_mtml.config import Config, config_of_older_plans
from distributed_mtml.console import say
from distributed_mtml.data.locate import ensure_suite
from distributed_mtml.data.prepare import TaskPrep, standardizes
from distributed_mtml.data.scan import Moments, TaskScan
from distributed_mtml.data.suite import SPLITS, TaskData
from distributed_mtml.data.validate import checked_scans
from distributed_mtml.errors import InputError
from distributed_mtml.meta.algorithms import ALGORITHMS, META_TASK
from distributed_mtml.meta.tasks import FAMILIES
from distributed_mtml.models import TaskShape
from distributed_mtml.runtime.monitor import check_monitor
from distributed_mtml.runtime.placement import place_tasks


class MetaPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Config
    source: Literal["family", "suite"]
    name: str  # the family or the suite's name
    suite_dir: str | None = None
    task: dict  # the TaskShape of the shared head
    suite_tasks: list[str] = []  # the suite's tasks meta-trained on, in order; empty for a family
    held_tasks: list[str] = []  # tasks held out of meta-training: the validation episodes' (`meta.val_task_share`)
    features: list[str] = []  # the feature columns a task's rows have (empty in older plans)
    prep: TaskPrep | None = None  # `suite`: the training suite's pooled statistics, every task's transform

    @model_validator(mode="before")
    @classmethod
    def _shards_of_older_plans(cls, raw: dict) -> dict:
        """Plans saved before elastic training held fixed shards (the tasks are what is kept);
        the model of plans saved under older defaults (`config_of_older_plans`)."""
        if not isinstance(raw, dict):
            return raw
        raw = {k: config_of_older_plans(v) if k == "config" else v for k, v in raw.items()}
        if "shards" not in raw:
            return raw
        shards = raw["shards"]  # round-robin: task i was on rank i mod W
        tasks = [s[i] for i in range(max(map(len, shards), default=0)) for s in shards if i < len(s)]
        return {"suite_tasks": tasks, **{k: v for k, v in raw.items() if k != "shards"}}

    def shape(self) -> TaskShape:
        return TaskShape(**self.task)

    def by_support(self) -> bool:
        """Each episode standardised by its support rows: `data.standardize: task`, and plans
        saved before the suite statistics (their tasks' own statistics are not to be had honestly)."""
        return self.source == "suite" and self.prep is None and standardizes(self.config.data.standardize)

    def task_rows(self, data: TaskData) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A task's rows per split as episodes draw them: the saved suite transform applied, or
        raw (`by_support`: each episode is transformed when drawn)."""
        if self.prep is not None:
            data = self.prep.apply(data)
        return {s: (torch.from_numpy(np.asarray(data.x[s], dtype=np.float32)), torch.from_numpy(data.y[s])) for s in SPLITS}

    def shards(self, world: int) -> list[list[str]]:
        """The suite's tasks per rank in a group of `world` (none for a family): derived at every
        (re)start, so an elastic run moves them with its worker count."""
        tasks = self.suite_tasks + self.held_tasks
        return place_tasks(tasks, world) if tasks else [[] for _ in range(world)]

    def holds(self, rank: int, world: int) -> list[str]:
        """What rank works on, for the run's placement record: its tasks, or its share of a
        family's meta-batch."""
        count = self.config.meta.meta_batch_size
        return self.shards(world)[rank] or [f"{share(count, world, rank)} of {count} episodes per meta-batch"]

    def episodes_of(self, rank: int, world: int, count: int, first: int = 0,
                    validation: bool = False) -> list[tuple[int, str | None]]:
        """[(episode index, task)] that rank computes of a meta-batch of `count` episodes (or of
        the validation set's: the held-out tasks', if any). A family's batch is split in
        contiguous shares; a suite's episode j takes task (first + j) mod T, cycling through the
        tasks, and is computed by the task's owner."""
        if not self.suite_tasks:
            start = sum(share(count, world, r) for r in range(rank))
            return [(j, None) for j in range(start, start + share(count, world, rank))]
        mine = set(self.shards(world)[rank])
        cycle = self.held_tasks if validation and self.held_tasks else self.suite_tasks
        tasks = [cycle[(first + j) % len(cycle)] for j in range(count)]
        return [(j, task) for j, task in enumerate(tasks) if task in mine]


def share(total: int, world: int, rank: int) -> int:
    """Rank `rank`'s part of `total` items split as evenly as possible."""
    return total // world + (rank < total % world)


def _suite_shape(config: Config, suite_dir: str) -> tuple[str, TaskShape, list[str], list[str], list[str], TaskPrep | None]:
    spec, scans = checked_scans(suite_dir, config.data.impute == "mean")
    need = config.meta.shots + config.meta.query_size()
    kept = enough_rows({t.name: scans[t.name].labelled["train"] for t in spec.tasks}, need, suite_dir,
                       "labelled train rows", "meta.shots + query", "tasks", "left out of meta-training")
    used = [t for t in spec.tasks if t.name in kept]
    kinds = {(t.type, TaskShape.of_scan(scans[t.name]).num_features, TaskShape.of_scan(scans[t.name]).num_classes)
             for t in used}
    if len(kinds) > 1:
        raise InputError(f"{suite_dir}/suite.yaml: meta-learning needs tasks of one type, feature count and class "
                         f"count (one shared head); found {sorted(kinds, key=str)}")
    kind, features, classes = kinds.pop()
    columns = scans[used[0].name].features  # what a new task's rows are read by
    train, held = _hold_out([t.name for t in used], config)
    prep = _suite_statistics([scans[t] for t in train], config) if config.data.standardize == "suite" else None
    return spec.name, TaskShape(META_TASK, kind, features, classes), train, held, columns, prep


def enough_rows(rows: dict[str, int], need: int, where: str, what: str, why: str, tasks: str, fate: str) -> list[str]:
    """The tasks with `need` rows or more for an episode; the others are counted in a line,
    and none left is an InputError naming `where`."""
    kept = [name for name, n in rows.items() if n >= need]
    if not kept:
        raise InputError(f"{where}: no task has the {need} {what} an episode needs ({why}); the largest has "
                         f"{max(rows.values())}")
    if len(kept) < len(rows):
        say(f"[mtml] {len(rows) - len(kept)} of {len(rows)} {tasks} have fewer than {need} {what} ({why}) and are {fate}")
    return kept


def _hold_out(tasks: list[str], config: Config) -> tuple[list[str], list[str]]:
    """(tasks meta-trained on, tasks held out for validation): `meta.val_task_share` of them,
    at least one, drawn with `training.seed`; none with a share of 0 or a single task."""
    share = config.meta.val_task_share
    if share == 0 or len(tasks) < 2:
        return tasks, []
    count = min(len(tasks) - 1, max(1, round(share * len(tasks))))
    order = np.random.default_rng(config.training.seed).permutation(len(tasks))
    held = set(order[:count].tolist())
    say(f"[mtml] {count} of {len(tasks)} tasks are held out of meta-training: the validation episodes are theirs "
        "(meta.val_task_share)")
    return [t for i, t in enumerate(tasks) if i not in held], [t for i, t in enumerate(tasks) if i in held]


def _suite_statistics(scans: list[TaskScan], config: Config) -> TaskPrep:
    """The transform of every task of a meta-learned model: train-split statistics pooled over
    the training tasks, column by position (the one shared head reads them alike)."""
    x, y = Moments(len(scans[0].usable_features())), None
    for scan in scans:
        x.merge(scan.x)
        if scan.y is not None:
            y = (y or Moments(1)).merge(scan.y)
    return TaskPrep.of_moments(x, y, scans[0].class_names(), True, config.data.impute == "mean")


def _plain_trunk_unless_asked(config: Config) -> Config:
    """`model.trunk.passthrough` defaults to a plain trunk for meta-learning: the passthrough
    default was chosen for multi-task sharing (bench_multilevel), and a meta-learned model
    adapting its head's weights on raw inputs too did worse after adapting than before on the
    sinusoid family (Meta-SGD, 600 iterations: query MSE 3.90 against 1.86 unadapted). Set it
    and it is used."""
    trunk = config.model.trunk
    if "passthrough" in trunk.model_fields_set:
        return config
    model = config.model.model_copy(update={"trunk": trunk.model_copy(update={"passthrough": False})})
    return config.model_copy(update={"model": model})


def make_meta_plan(config: Config) -> MetaPlan:
    config = _plain_trunk_unless_asked(config)
    if config.scaling.num_workers == "auto":
        raise InputError("key 'scaling.num_workers': auto is for mtml train; meta-training takes a number (0: in this process)")
    meta, workers = config.meta, config.scaling.max_workers
    if meta.algorithm not in ALGORITHMS:
        raise InputError(f"key 'meta.algorithm': unknown '{meta.algorithm}' (choose from: {', '.join(ALGORITHMS)})")
    if not ARCHITECTURES[config.model.architecture].meta:
        able = ", ".join(n for n, a in ARCHITECTURES.items() if a.meta)
        raise InputError(f"key 'model.architecture': meta-learning trains {able}, not '{config.model.architecture}' "
                         "(its loops adapt one trunk and one head)")
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
    name, shape, tasks, held, columns, prep = _suite_shape(config, suite_dir)
    if ALGORITHMS[meta.algorithm].closed_form and shape.type != "regression":
        raise InputError(f"key 'meta.algorithm': {meta.algorithm} solves a regression head; the suite's tasks are "
                         f"{shape.type} (use maml, fomaml, reptile, anil or metasgd)")
    if len(tasks) + len(held) < workers:
        raise InputError(f"{suite_dir}: {len(tasks) + len(held)} tasks cannot be sharded over {workers} workers "
                         "(scaling.num_workers)")
    return MetaPlan(config=config, source="suite", name=name, suite_dir=suite_dir, task=shape.to_dict(),
                    suite_tasks=tasks, held_tasks=held, features=columns, prep=prep)
