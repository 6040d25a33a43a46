"""`mtml transfer`: every configured strategy once, each a child MLflow run of one parent.

Strategies run one after another in this process (a K-shot target is small); each child run
gets tags `mtml.command`, `mtml.strategy`, its settings as params, the validation learning
curve as `target/val/<metric>` (step = optimisation step), the final test score as
`target/test/<metric>`, and a plot; the parent gets the summary table (test, val beside it).
"""

from __future__ import annotations

import os
import tempfile
import time

from distributed_mtml import report
from distributed_mtml.baseline import trivial_output
from distributed_mtml.config import Config, run_params
from distributed_mtml.evaluate import split_metrics
from distributed_mtml.tracking import Tracker
from distributed_mtml.transfer.fit import Curve, fit
from distributed_mtml.transfer.source import TransferInputs, load_inputs
from distributed_mtml.transfer.strategies import STRATEGIES, build, check, chosen

HEADLINE = {"classification": ("accuracy", "max"), "regression": ("mse", "min")}


def strategy_settings(strategy: str, lr: float, steps: int, partial_layers: int, adapter_width: int) -> dict:
    """The settings a strategy actually uses (logged as its child run's params)."""
    given = {"lr": lr, "partial_layers": partial_layers, "adapter_width": adapter_width}
    return {"steps": steps, **{k: given[k] for k in STRATEGIES[strategy].settings}}


def log_curve(tracker: Tracker, run_id: str, curve: Curve, title: str) -> None:
    for step, metrics in curve:
        tracker.log_metrics(run_id, {f"target/{k}": v for k, v in metrics.items()}, step)
    with tempfile.TemporaryDirectory() as d:
        path = report.learning_curves({title: {"target val loss": [(s, m["val/loss"]) for s, m in curve]}},
                                      d, x_label="step", y_label="validation loss")[0]
        tracker.client().log_artifact(run_id, path, "plots")


def results_header(metric: str) -> list[str]:
    """The columns of `run_transfer`'s rows: test first (reported), val beside it."""
    return ["strategy", f"test {metric}", "test loss", f"val {metric}", "seconds"]


def run_transfer(config: Config, tracker: Tracker, run_name: str) -> tuple[str, list[str], list[list]]:
    """Runs every strategy of `transfer.strategies`; returns the parent run id, table header and rows."""
    t = config.transfer
    t.strategies = chosen(t.strategies)  # every registered strategy unless the config names some
    inputs = load_inputs(config, tracker)
    for strategy in t.strategies:  # all problems before anything runs
        check(strategy, inputs, t.partial_layers)
    metric, _ = HEADLINE[inputs.target.type]
    tags = {"mtml.command": "transfer", "mtml.suite": os.path.basename(t.target.resolved_path())}
    parent = tracker.create_run(config.tracking.transfer_experiment_name(), run_name, tags,
                                 run_params(config, "transfer"), config_name=run_name)
    rows = []
    with tracker.final_status(parent):
        for strategy in t.strategies:
            rows.append(_one_strategy(strategy, inputs, config, tracker, parent, metric))
        rows.append(anchor_row(inputs, metric))
        tracker.log_metrics(parent, {f"anchor/{k}": v for k, v in zip(("test", "test_loss", "val"), rows[-1][1:4])}, step=0)
        tracker.client().log_text(parent, report.table(results_header(metric), rows), "transfer/results.txt")
    return parent, results_header(metric), rows


ANCHOR = "anchor: the K labels alone"


def anchor_row(inputs: TransferInputs, metric: str) -> list:
    """What the K labels alone score, beside the strategies: their mean (regression) or class
    frequencies, as a constant prediction. A strategy that does not beat it has not used the
    source model or the target's features."""
    constant = trivial_output(inputs.target, [inputs.train[1]])
    scores = {}
    for split in ("val", "test"):
        x, y = inputs.scored(split)
        metrics = split_metrics(inputs.target, inputs.prep, [(x, y)], lambda rows: constant.to(rows.dtype).expand(len(rows), -1),
                                exact_rows=len(y))
        scores.update({f"{split}/{k}": v for k, v in metrics.items()})
    return [ANCHOR, scores[f"test/{metric}"], scores["test/loss"], scores[f"val/{metric}"], 0.0]


def _one_strategy(strategy: str, inputs: TransferInputs, config: Config, tracker: Tracker, parent: str, metric: str) -> list:
    t = config.transfer
    settings = strategy_settings(strategy, t.lr, t.steps, t.partial_layers, t.adapter_width)
    tags = {"mtml.command": "transfer", "mtml.strategy": strategy, "mlflow.parentRunId": parent}
    child = tracker.create_run(config.tracking.transfer_experiment_name(), strategy, tags,
                                {**settings, "shots": t.shots})
    with tracker.final_status(child):
        begin = time.perf_counter()
        built = build(strategy, inputs, t.partial_layers, t.adapter_width, t.seed)
        curve = fit(built, inputs, t.steps, t.lr, t.eval_every, test=True)
        seconds = time.perf_counter() - begin
        log_curve(tracker, child, curve, f"{strategy} on {inputs.target.name}")
    final = curve[-1][1]
    return [strategy, final[f"test/{metric}"], final["test/loss"], final[f"val/{metric}"], seconds]
