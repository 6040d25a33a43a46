"""The MLflow pyfunc model of a run ("models from code"): MLflow runs this file to build the model.

MLflow's default for a `PythonModel` is to cloudpickle it, and its pytorch flavor unpickles whole
modules: loading either can run whatever the file holds. Here nothing is pickled: the model is
this code (shipped with the package in the model's `code/`) plus the run's weights, state dicts
read with `torch.load(weights_only=True)` by `predict.Predictor`.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class MultiTaskModelPyfunc(PythonModel):
    """Raw feature columns in, every task's prediction out (see `predict.Predictor`); the param
    `tasks` ("a,b") picks tasks."""

    def load_context(self, context) -> None:
        from distributed_mtml.predict import Predictor

        self.predictor = Predictor(context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        tasks = (params or {}).get("tasks") or None
        return self.predictor.predict(model_input, tasks.split(",") if tasks else None)


mlflow.models.set_model(MultiTaskModelPyfunc())
