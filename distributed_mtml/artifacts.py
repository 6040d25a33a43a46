"""A trained model: one place that loads it, whichever recipe made it, from wherever it is.

A model directory is a checkpoint, or the weights of a run's MLflow model: `state.pt` says what
it holds (`kind: meta` for a meta-learned trunk with its one head and inner rule, a multi-task
trunk with every task's head otherwise), and every file loads with `torch.load(weights_only=True)`.
`model_dir` finds the weights of any model reference a command takes. (Writing the MLflow model:
`model_log`.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Iterator

from distributed_mtml.errors import InputError
from distributed_mtml.meta.checkpoint import load_learner
from distributed_mtml.models import MultiTaskModel
from distributed_mtml.runtime.checkpoint import (
    STATE_FILE,
    TRUNK_FILE,
    load_into,
    load_state,
    load_state_dict,
    task_states,
)
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.checkpoint import load_shared_heads
from distributed_mtml.train.plan import TrainPlan

if TYPE_CHECKING:
    from distributed_mtml.meta.algorithms import MetaLearner

MODEL_NAME = "model"  # the run's MLflow model: runs:/<id>/model
WEIGHTS = "weights"  # the MLflow model's artifact holding the model directory
MODEL_URI_SCHEMES = ("runs:/", "models:/")


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
    load_shared_heads(model.shared_heads, directory)
    states = task_states(directory, list(model.task_modules))
    for name, module in model.task_modules.items():
        load_state_dict(module, states[name], f"{directory} (task '{name}')")
    model.eval()
    return model, state["plan"]


@contextlib.contextmanager
def model_dir(model: str | None, checkpoint: str | None, tracker: Tracker, flag: str = "--run") -> Iterator[str]:
    """A local directory holding the model: the checkpoint, or the model that `model` names (a run
    id, `runs:/<id>/model`, `models:/<name>/<version>` or `models:/<name>@<alias>`) downloaded."""
    if checkpoint is not None:
        if not os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            raise InputError(f"--checkpoint {checkpoint}: no {STATE_FILE}, not a checkpoint directory")
        yield checkpoint
        return
    with tempfile.TemporaryDirectory() as d:
        yield _download(model, tracker, d, flag)


def _download(model: str, tracker: Tracker, out: str, flag: str) -> str:
    """The model's weights directory under `out`. A bare run id means its MLflow model (or, for
    runs older than it, its `model/` artifact)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model.startswith(MODEL_URI_SCHEMES):
        try:
            tracker.client().get_run(model)
        except MlflowException:
            raise InputError(f"{flag}: no run '{model}' in {tracker}") from None
    uri = model if model.startswith(MODEL_URI_SCHEMES) else f"runs:/{model}/{MODEL_NAME}"
    if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:  # runs:/<id>: its model
        uri = f"{uri.rstrip('/')}/{MODEL_NAME}"
    try:
        with tracker.active():
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=out)
    except (MlflowException, OSError) as e:
        raise InputError(f"{flag} {model}: not found in {tracker} ({str(e).splitlines()[0][:200]})") from None
    for weights in (os.path.join(path, "artifacts", WEIGHTS), path):  # an MLflow model, or an older run's files
        if os.path.exists(os.path.join(weights, STATE_FILE)):
            return weights
    raise InputError(f"{flag} {model}: {uri} holds no model of distributed_mtml ({STATE_FILE} not found)")


def model_from_run(run_id: str, tracker: Tracker) -> MultiTaskModel:
    """Downloads `runs:/<id>/model` and loads it with weights_only=True."""
    with model_dir(run_id, None, tracker) as path:
        model, _ = load_model(path)
    return model
