"""The driver's preparation of a run: the suite checked, task shapes known, tasks placed.

Everything here happens before any Ray worker starts, so bad input fails fast with exit 2.
The resulting `TrainPlan` is the whole payload a worker receives; the worker re-validates it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from distributed_mtml.config import Config
from distributed_mtml.data.locate import ensure_suite
from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.suite import load_task
from distributed_mtml.data.validate import checked_suite
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
    placement: list[list[str]]
    steps_per_epoch: int
    preprocessing: dict[str, TaskPrep] = {}  # per task; empty in checkpoints older than data.standardize

    def task_shapes(self) -> list[TaskShape]:
        return [TaskShape(**t) for t in self.tasks]

    def prep(self, task: str) -> TaskPrep:
        """The task's preprocessing (none recorded: inputs used as they are)."""
        return self.preprocessing.get(task) or TaskPrep()


def make_plan(config: Config) -> TrainPlan:
    suite_dir = ensure_suite(config)
    spec = checked_suite(suite_dir)
    shapes, train_rows, preps = [], {}, {}
    for task in spec.tasks:
        data = load_task(suite_dir, task)
        shapes.append(TaskShape.of(data))
        train_rows[task.name] = len(data.y["train"])
        preps[task.name] = TaskPrep.fit(data, config.data.standardize)
    check_monitor(config, monitor_keys(shapes))
    placement = place_tasks([t.name for t in spec.tasks], config.scaling.num_workers)
    steps = config.training.steps_per_epoch or math.ceil(max(train_rows.values()) / config.training.batch_size)
    return TrainPlan(
        config=config,
        suite_dir=suite_dir,
        suite_name=spec.name,
        tasks=[s.to_dict() for s in shapes],
        train_rows=train_rows,
        placement=placement,
        steps_per_epoch=steps,
        preprocessing=preps,
    )
