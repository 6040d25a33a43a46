"""A trained model as a file set: one place that loads it, whichever recipe made it.

A model directory is a checkpoint (or the `model/` artifact copied from one): `state.pt` says
what it holds (`kind: meta` for a meta-learned trunk with its one head and inner rule, a
multi-task trunk with every task's head otherwise), and every file loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Iterator

from distributed_mtml.errors import InputError
from distributed_mtml.meta.checkpoint import load_learner
from distributed_mtml.models import MultiTaskModel
from distributed_mtml.runtime.checkpoint import STATE_FILE, TRUNK_FILE, load_into, load_state, task_file
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.plan import TrainPlan

if TYPE_CHECKING:
    from distributed_mtml.meta.algorithms import MetaLearner


def load_with_learner(directory: str) -> tuple[MultiTaskModel, dict, "MetaLearner | None"]:
    """`load_model`, and for a meta-learned model also its learner (its inner rule: the
    parameters it adapts and their rates), which transfer adapts with."""
    if load_state(directory).get("kind") == "meta":
        learner, plan = load_learner(directory)
        return learner.model, plan, learner
    return (*load_model(directory), None)


def load_model(directory: str) -> tuple[MultiTaskModel, dict]:
    """The full trunk + every head from a checkpoint (or model artifact) directory, and its plan.
    A meta-learned model is a trunk with one head, "meta"."""
    state = load_state(directory)
    if state.get("kind") == "meta":
        learner, plan = load_learner(directory)
        return learner.model, plan
    plan = TrainPlan.model_validate(state["plan"])
    model = MultiTaskModel(plan.config.model, plan.task_shapes(), plan.config.training.seed, plan.preprocessing)
    load_into(model.trunk, os.path.join(directory, TRUNK_FILE))
    for name, module in model.task_modules.items():
        load_into(module, os.path.join(directory, task_file(name)))
    model.eval()
    return model, state["plan"]


@contextlib.contextmanager
def model_dir(run_id: str | None, checkpoint: str | None, tracker: Tracker) -> Iterator[str]:
    """A local directory holding the model: the checkpoint, or `runs:/<id>/model` downloaded."""
    if checkpoint is not None:
        if not os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            raise InputError(f"--checkpoint {checkpoint}: no {STATE_FILE}, not a checkpoint directory")
        yield checkpoint
        return
    from mlflow.exceptions import MlflowException

    c = tracker.client()
    try:
        c.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run: no run '{run_id}' in {tracker}") from None
    with tempfile.TemporaryDirectory() as d:
        yield c.download_artifacts(run_id, "model", d)


def model_from_run(run_id: str, tracker: Tracker) -> MultiTaskModel:
    """Downloads `runs:/<id>/model` and loads it with weights_only=True."""
    with model_dir(run_id, None, tracker) as path:
        model, _ = load_model(path)
    return model
