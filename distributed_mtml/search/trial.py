"""One trial of a training search: a real `mtml train` run inside a Ray Tune trial.

The run is a child MLflow run of the search's parent. A `search` trial logs its params, its
curves and its validation numbers only, no model and nothing of the test split; a `repeat`
trial is a whole run (test metrics, baseline, figures, its model). Every epoch goes to Tune as
`epochs_done` and `monitor` (the value of `checkpoint.monitor`, what ASHA stops trials on): in
local mode from the metrics callback in the trial's own process, on workers through Ray Train's
report queue into the trial (`TuneReportCallback`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from distributed_mtml.runtime.monitor import SCORE

RUN_ID = "mtml_run_id"  # the key of a trial's results that names its MLflow run


def tune_result(epoch_metrics: dict, run_id: str) -> dict[str, Any]:
    """What Tune gets of an epoch: its number from 1, the monitored value, the run."""
    return {"epochs_done": int(epoch_metrics["epoch"]) + 1, "monitor": float(epoch_metrics[SCORE]), RUN_ID: run_id}


@dataclass(frozen=True)
class TrialRole:
    """What a training run is to the search that started it."""

    parent: str  # the search's MLflow run
    stage: str  # "search": validation only; "repeat": a whole run

    def tags(self) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent, "mtml.stage": self.stage}

    @property
    def whole(self) -> bool:
        """Whether the run logs what a finished `mtml train` logs (test metrics, its model)."""
        return self.stage == "repeat"

    @staticmethod
    def on_epoch(run_id: str, epoch_metrics: dict) -> None:
        import ray.tune

        ray.tune.report(tune_result(epoch_metrics, run_id))

    @staticmethod
    def train_callbacks(run_id: str) -> list:
        return [_epochs_to_tune(run_id)]


def _epochs_to_tune(run_id: str):
    """Ray Train's callback into the trial's Tune session, one result per epoch a report covers."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            for epoch in metrics[0].get("epochs") or [metrics[0]]:
                self._training_actor_item_queue.put(tune_result(epoch, run_id))

    return EpochsToTune()


def training_trial(values: dict[str, Any], base: dict, parent: str, stage: str, uri: str, name: str) -> None:
    """A Tune function: the config with the trial's values, trained as `mtml train` trains it.
    Its last result holds the run's kept validation value (`kept`) and, for a repeat, its test
    value and kept checkpoint."""
    import ray.tune
    import torch

    from distributed_mtml.search.space import trial_config
    from distributed_mtml.search.summary import test_value
    from distributed_mtml.tracking import Tracker
    from distributed_mtml.train.launch import run_training

    config = trial_config(base, values)
    if config.scaling.local:
        torch.set_num_threads(1)  # a trial's share of the CPUs: several run at once
    begin = time.perf_counter()
    run_name = f"{name}-{stage}-{ray.tune.get_context().get_trial_id()}"
    outcome = run_training(config, run_name, Tracker(uri), trial=TrialRole(parent, stage))
    # no epochs_done: ASHA passes a result without it, and the kept epoch may be an early one
    result = {"monitor": outcome.kept[SCORE], RUN_ID: outcome.run_id, "kept": outcome.kept[SCORE],
              "seconds": time.perf_counter() - begin}
    if stage == "repeat":
        result.update(test=test_value(outcome.metrics, config.checkpoint.monitor), checkpoint=outcome.checkpoint_path)
    ray.tune.report(result)
