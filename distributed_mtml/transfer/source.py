"""The source model and the target task, loaded and checked on the driver.

Everything a strategy needs travels as one `TransferInputs` object: the source's trunk and
heads (and, for a meta-learned source, its inner rule), and the target's K training rows, its
validation split (what selection sees) and its test split (what is reported). Bad input (no such run, unknown task, K above the train split) is an
InputError here, before any trial starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from distributed_mtml.config import Config
from distributed_mtml.data.locate import ensure_suite_at
from distributed_mtml.data.prepare import TaskPrep, standardizes
from distributed_mtml.data.tasks import load_task
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.errors import InputError
from distributed_mtml.models import InnerRule, MultiTaskModel, TaskShape
from distributed_mtml.tracking import Tracker


@dataclass
class TransferInputs:
    model: MultiTaskModel  # the source: trunk + every head ("meta" for a meta-learned one)
    source_config: dict  # the source run's config (model architecture, meta inner rule)
    learner: InnerRule | None  # a meta-learned source's learner: its inner rule adapts the target
    target: TaskShape
    pool: tuple[torch.Tensor, torch.Tensor]  # the target's whole train split
    shots: int
    val: tuple[torch.Tensor, torch.Tensor]  # scores the learning curve, ASHA and every selection
    test: tuple[torch.Tensor, torch.Tensor]  # scored once per fit, for the reported numbers
    prep: TaskPrep  # features standardised by the train split; after draw, the target by the K rows
    train: tuple[torch.Tensor, torch.Tensor] | None = None  # the K labelled examples, once drawn

    def draw(self, seed: int) -> "TransferInputs":
        """These inputs with K examples drawn from the pool by `seed` (a K-shot resample); a
        regression target is standardised by those K labels only."""
        rows = torch.from_numpy(k_shot_rows(self.pool[1].numpy(), self.shots, seed))
        x, y = self.pool[0][rows], self.pool[1][rows]
        prep = self.prep.with_target_of(y)
        return replace(self, train=(x, prep.scaled_target(y)), prep=prep)

    def scored(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`val` or `test` rows with the target on the model's scale."""
        x, y = getattr(self, split)
        return x, self.prep.scaled_target(y)



def _source_dir(source: str, tracker: Tracker, experiment: str):
    """The model directory of `source`: a model URI (runs:/<id>/model, models:/<name>/<version>
    or @<alias>), a checkpoint directory, a run id, or the newest finished run of that name in
    `experiment` (so `source: demo` follows `mtml demo`)."""
    import os

    from distributed_mtml.artifacts import MODEL_URI_SCHEMES, model_dir

    if source.startswith(MODEL_URI_SCHEMES):
        return model_dir(source, None, tracker, "transfer.source")
    if os.path.isdir(source):
        return model_dir(None, source, tracker)
    named = tracker.newest_run_of(experiment, source, "attributes.status = 'FINISHED'")
    if named:
        return model_dir(named.info.run_id, None, tracker, "transfer.source")
    if len(source) != 32:
        raise InputError(f"transfer.source: '{source}' is no checkpoint directory, run id, or finished run "
                         f"name in experiment '{experiment}' of {tracker}")
    return model_dir(source, None, tracker, "transfer.source")


def load_source(source: str, tracker: Tracker, experiment: str) -> tuple[MultiTaskModel, dict, InnerRule | None]:
    """The source's model, its config, and for a meta-learned source its learner."""
    from distributed_mtml.artifacts import load_with_learner

    with _source_dir(source, tracker, experiment) as directory:
        model, plan, learner = load_with_learner(directory)
    return model, plan["config"], learner


def k_shot_rows(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Which train rows form the K-shot set: a seeded draw, so repeats resample K."""
    return np.random.default_rng([seed, shots]).permutation(len(y))[:shots]


def load_inputs(config: Config, tracker: Tracker) -> TransferInputs:
    """The source model and the target's data; K examples drawn by `transfer.seed`."""
    t = config.transfer
    for key in ("source", "target", "target_task"):
        if getattr(t, key) is None:
            raise InputError(f"transfer.{key}: required")
    model, source_config, learner = load_source(t.source, tracker, config.tracking.experiment)
    suite_dir = ensure_suite_at(t.target)
    spec = checked_suite(suite_dir)
    tasks = {task.name: task for task in spec.tasks}
    if t.target_task not in tasks:
        shown = ", ".join(list(tasks)[:10]) + (f", ... ({len(tasks)} in all)" if len(tasks) > 10 else "")
        raise InputError(f"transfer.target_task: no task '{t.target_task}' in {suite_dir}/suite.yaml (tasks: {shown})")
    task = tasks[t.target_task]
    data = load_task(suite_dir, task)
    available = len(data.y["train"])
    if t.shots > available:
        raise InputError(f"transfer.shots: {t.shots} exceeds the {available} rows of split 'train' "
                         f"in {suite_dir}/{task.path}")
    prep = TaskPrep.fit(data, standardizes(config.data.standardize))
    split = {s: (torch.from_numpy(prep.inputs(data.x[s])), torch.from_numpy(data.y[s])) for s in ("train", "val", "test")}
    return TransferInputs(model, source_config, learner, TaskShape.of(data), split["train"], t.shots, split["val"],
                          split["test"], prep).draw(t.seed)


