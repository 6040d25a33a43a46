"""The run's MLflow model, written at the end of a run from its kept checkpoint.

`runs:/<id>/model` is an MLflow 3 logged model: the pyfunc of `mtml_pyfunc.py` ("models from
code": nothing pickled), the package's code, and the model's files without the optimiser state
(that stays in checkpoints), with a signature and an input example. Registering makes it a
version of a registered model.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING

from distributed_mtml import compat
from distributed_mtml.artifacts import MODEL_NAME, WEIGHTS
from distributed_mtml.errors import InputError
from distributed_mtml.predict import Predictor
from distributed_mtml.tracking import Tracker

if TYPE_CHECKING:
    import pandas as pd

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PYFUNC_FILE = os.path.join(PACKAGE_DIR, "mtml_pyfunc.py")


def copy_model_files(checkpoint: str, out: str) -> str:
    """The checkpoint's model files (state, trunk, heads, learned rates) without its optimiser
    state, which only resuming needs."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(checkpoint):
        if name.endswith(".pt") and not name.startswith("optim"):
            shutil.copy2(os.path.join(checkpoint, name), out)
    return out


def requirements() -> list[str]:
    """What the model needs installed: the project's own dependencies at the versions that
    trained it (the package's code travels in the model)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    def pin(name: str) -> str:  # the public version: "2.13.0", not a local build's "2.13.0+cpu"
        return f"{name}=={Version(importlib.metadata.version(name)).public}"

    names = [Requirement(line) for line in importlib.metadata.requires("distributed_mtml") or []]
    return [pin(r.name) for r in names if r.marker is None and r.name != "ray"] + [pin("pandas")]  # serving needs no Ray


def input_example(suite_dir: str, features: dict[str, list[str]], rows: int = 3) -> "pd.DataFrame":
    """A few rows of each task's features as in its file: the model's input example, which
    MLflow also checks the model answers. Tasks with different features: the union of columns,
    each task's rows empty in the others' columns. A grouped entry gives one example, with its
    group column (rows are routed by it)."""
    import pandas as pd

    from distributed_mtml.data.scan import head_rows
    from distributed_mtml.data.tasks import load_suite_spec

    entries = {t.entry: t for t in load_suite_spec(suite_dir).tasks if t.name in features}
    return pd.concat([head_rows(suite_dir, t, [*features[t.name], *([t.group_column] if t.grouped else [])],
                                rows).to_pandas() for t in entries.values()], ignore_index=True)


def log_mlflow_model(tracker: Tracker, run_id: str, checkpoint: str, example: "pd.DataFrame", step: int,
                     register: str | None = None):
    """The kept checkpoint as the run's MLflow model, with its signature (the feature columns in,
    one column per task output) and an input example; `register`: also a version of that
    registered model. Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import Model, ModelSignature, infer_signature

    with tempfile.TemporaryDirectory() as d:
        weights = copy_model_files(checkpoint, os.path.join(d, WEIGHTS))
        predictor = Predictor(weights)
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": class indices never do
            warnings.simplefilter("ignore", UserWarning)
            outputs = infer_signature(example, predictor.predict(example)).outputs
        signature = ModelSignature(_input_schema(predictor, example), outputs, infer_signature(params={"tasks": ""}).params)
        experiment = tracker.client().get_run(run_id).info.experiment_id
        # Model.log writes through MLflow's current store and experiment
        with tracker.active(experiment), compat.mlflow_requirements_unscanned():
            return Model.log(None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, step=step,
                             python_model=PYFUNC_FILE, artifacts={WEIGHTS: weights}, code_paths=[PACKAGE_DIR],
                             signature=signature, input_example=example, pip_requirements=requirements(),
                             registered_model_name=register)


def _input_schema(predictor, example: "pd.DataFrame"):
    """Every feature column as a double, whatever its type in the suite: the model reads them all as
    float32, and MLflow converts only safely (float64 to float32 it refuses). A column that not
    every task reads is optional: a table for one task need not carry the others' columns. A
    group column as its type in the example, optional (without it, a table names its tasks)."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    everyone = set.intersection(*(set(predictor.features[t]) for t in predictor.tasks))
    groups = [route["column"] for route in predictor.groups.values()]
    kinds = {spec.name: spec.type for spec in infer_signature(example[groups]).inputs.inputs} if groups else {}
    return Schema([*(ColSpec("double", c, required=c in everyone) for c in predictor.input_columns()),
                   *(ColSpec(kinds[c], c, required=False) for c in groups)])


def register_model(tracker: Tracker, run_id: str, name: str):
    """A new version of registered model `name` from the run's MLflow model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    c = tracker.client()
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run: no run '{run_id}' in {tracker}") from None
    found = c.search_logged_models([run.info.experiment_id], filter_string=f"name = '{MODEL_NAME}'")
    mine = [m for m in found if m.source_run_id == run_id]
    if not mine:
        raise InputError(f"--run {run_id}: it has no MLflow model (runs before `mtml register` existed, "
                         "or a run that did not finish)")
    with tracker.active():
        return mlflow.register_model(f"models:/{mine[0].model_id}", name)
