"""`mtml tune`: Ray Tune over transfer strategies and their settings, then honest repeats.

Stage 1, search: every strategy with `tune.num_samples` sampled settings (learning rate,
partial's k, the adapter width: each strategy uses only its own), all trials under one ASHA
scheduler on the target's validation loss, whose rungs are the fit's evaluations. The test
split is not scored in this stage at all.
Stage 2, repeats: each strategy's best setting (by validation) again under `tune.repeats`
seeds, each seed also redrawing the K examples, run to the end; their final test metric gives
the reported mean +- 95% CI, and the best strategy is the one with the best mean validation
metric: nothing is ever chosen on the numbers that are reported.

Trials train in their own processes with `tune.cpus_per_trial` CPUs (fractions allowed, so a
2-core laptop runs several without deadlock). MLflow: one parent run; a Tune callback in this
driver process (one writer) makes a child run per trial with `mtml.strategy` and
`mtml.stage`, and logs its learning curve. The parent gets the table as CSV, a bar chart and
the tag `mtml.best_strategy`.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from typing import Any

from distributed_mtml import compat, report
from distributed_mtml.config import Config, run_params
from distributed_mtml.console import trials_progress
from distributed_mtml.stats import mean_ci
from distributed_mtml.tracking import Tracker
from distributed_mtml.transfer.fit import fit
from distributed_mtml.transfer.run import HEADLINE, strategy_settings
from distributed_mtml.transfer.source import TransferInputs, load_inputs
from distributed_mtml.transfer.strategies import build, check, chosen


def transfer_trial(config: dict[str, Any], inputs: TransferInputs) -> None:
    """One Tune trial: draw K examples by the trial's seed, build, fit, report every evaluation.
    With `workers` > 1 the fit is a TorchTrainer built here (Ray Train V2 inside Tune)."""
    import ray.tune
    import torch

    if config["workers"] > 1:
        return _distributed_trial(config, inputs)
    torch.set_num_threads(1)
    drawn = inputs.draw(config["seed"])
    begin = time.perf_counter()
    built = build(config["strategy"], drawn, config["partial_layers"], config["adapter_width"], config["seed"])
    fit(built, drawn, config["steps"], config["lr"], config["eval_every"],
        report=lambda step, m: ray.tune.report({**m, "step": step, "seconds": time.perf_counter() - begin}),
        test=config["test"])


def _fit_worker(payload: dict) -> None:
    """One rank of a distributed trial: the same model on every rank, DDP over its K-row shard."""
    import ray.train
    import torch
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    config, ctx = payload["config"], ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    drawn = ray.get(payload["inputs"]).draw(config["seed"])
    built = build(config["strategy"], drawn, config["partial_layers"], config["adapter_width"], config["seed"])
    begin = time.perf_counter()
    report = lambda step, m: ray.train.report({**m, "step": step, "seconds": time.perf_counter() - begin})  # noqa: E731
    if built.rates is not None:  # meta_adapt's inner rule is not a DDP backward: every rank runs it whole
        fit(built, drawn, config["steps"], config["lr"], config["eval_every"], report=report, test=config["test"])
        return
    for name, p in built.model.named_parameters():
        p.requires_grad_(name in set(built.trainable))
    shard = replace(drawn, train=tuple(t[rank::world] for t in drawn.train))
    fit(built, shard, config["steps"], config["lr"], config["eval_every"], report=report,
        forward=DistributedDataParallel(built.model), test=config["test"])


def _distributed_trial(config: dict[str, Any], inputs: TransferInputs) -> None:
    import ray
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = ray.tune.get_context()
    trainer = TorchTrainer(
        _fit_worker,
        train_loop_config={"config": config, "inputs": ray.put(inputs)},
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers"],
                                               resources_per_worker={"CPU": config["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=f"trial-{trial.get_trial_id()}", storage_path=config["storage"],
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _callback(tracker: Tracker, experiment: str, parent: str, stage: str, shots: int):
    import ray.tune

    class MLflowChildRuns(ray.tune.Callback):
        """A child MLflow run per trial, written from the Tune driver (one writer)."""

        def __init__(self):
            self.runs: dict[str, str] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            c = trial.config
            settings = strategy_settings(c["strategy"], c["lr"], c["steps"], c["partial_layers"], c["adapter_width"])
            tags = {"mtml.command": "tune", "mtml.strategy": c["strategy"], "mtml.stage": stage,
                    "mlflow.parentRunId": parent}
            name = f"{stage}-{c['strategy']}-{trial.trial_id}"
            self.runs[trial.trial_id] = tracker.create_run(experiment, name, tags,
                                                            {**settings, "seed": c["seed"], "shots": shots})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = {f"target/{k}": v for k, v in result.items() if k.startswith(("val/", "test/"))}
            tracker.log_metrics(self.runs[trial.trial_id], metrics, int(result["step"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            tracker.set_status(self.runs[trial.trial_id], "FINISHED")
            trials_progress(stage, trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            tracker.set_status(self.runs[trial.trial_id], "FAILED")
            trials_progress(stage, trials, trial)

    return MLflowChildRuns()


def _tuner(config: Config, inputs: TransferInputs, space: dict, stage: str, tracker: Tracker, parent: str, asha: bool):
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    t, tn = config.transfer, config.tune
    evaluations = t.steps // t.eval_every + 1 + (t.steps % t.eval_every > 0)
    # a distributed trial's driver only waits on its workers, which hold their own CPUs
    driver_cpus = tn.cpus_per_trial if tn.workers_per_trial == 1 else 0.01
    per_trial = driver_cpus + (tn.cpus_per_trial * tn.workers_per_trial if tn.workers_per_trial > 1 else 0)
    concurrent = tn.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    # max_t one past the last evaluation: a trial that ASHA keeps ends by returning, never by a
    # stop on its last report, which would kill a distributed trial's TorchTrainer mid-teardown
    # and leave its workers' placement group to Ray Train's cleaner (that needs the dashboard)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations + 1,
                              grace_period=tn.grace_period) if asha else None
    trainable = ray.tune.with_resources(ray.tune.with_parameters(transfer_trial, inputs=inputs), {"cpu": driver_cpus})
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(metric="val/loss", mode="min", scheduler=scheduler,
                                        num_samples=tn.num_samples if asha else 1, max_concurrent_trials=concurrent),
        run_config=ray.tune.RunConfig(
            name=f"{stage}-{parent[:12]}", storage_path=config.checkpoint.resolved_dir(), verbose=0,
            callbacks=[_callback(tracker, config.tracking.transfer_experiment_name(), parent, stage, t.shots)],
        ),
    )


def _search_space(config: Config, inputs: TransferInputs) -> dict:
    import ray.tune

    t = config.transfer
    depth = sum(1 for m in inputs.model.trunk.modules() if m.__class__.__name__ == "Linear")
    return {
        "strategy": ray.tune.grid_search(t.strategies),
        "lr": ray.tune.loguniform(t.lr / 10, t.lr * 10),
        "partial_layers": ray.tune.randint(1, depth + 1),
        "adapter_width": ray.tune.choice([4, 8, 16, 32]),
        "steps": t.steps, "eval_every": t.eval_every, "seed": t.seed, "test": False, **_trial_scaling(config),
    }


def _trial_scaling(config: Config) -> dict:
    """Constants every trial needs to decide whether it is one process or a TorchTrainer."""
    tn = config.tune
    return {"workers": tn.workers_per_trial, "cpus_per_worker": tn.cpus_per_trial,
            "storage": config.checkpoint.resolved_dir()}


def _best_settings(results, strategies: list[str]) -> dict[str, dict]:
    """Per strategy, the setting of its trial with the lowest last validation loss."""
    best: dict[str, tuple[float, dict]] = {}
    for result in results:
        if result.error is not None or "val/loss" not in result.metrics:
            continue
        s = result.config["strategy"]
        if s not in best or result.metrics["val/loss"] < best[s][0]:
            best[s] = (result.metrics["val/loss"], result.config)
    return {s: best[s][1] for s in strategies if s in best}


def run_tune(config: Config, tracker: Tracker, run_name: str, address: str | None = None
             ) -> tuple[str, list[str], list[list], str]:
    """Search, repeat, summarise; returns (parent run id, table header, rows, best strategy)."""
    import ray.tune

    from distributed_mtml.runtime.cluster import ensure_ray

    t, tn = config.transfer, config.tune
    # Tune's own SIGINT handler stops the search and returns partial results, on which the
    # repeats would then run: Ctrl-C must end the whole command instead (KILLED)
    compat.set_environment(TUNE_DISABLE_SIGINT_HANDLER="1")
    t.strategies = chosen(t.strategies)  # every registered strategy unless the config names some
    inputs = load_inputs(config, tracker)
    for strategy in t.strategies:
        check(strategy, inputs, t.partial_layers)
    metric, direction = HEADLINE[inputs.target.type]
    tags = {"mtml.command": "tune", "mtml.suite": os.path.basename(t.target.resolved_path())}
    parent = tracker.create_run(config.tracking.transfer_experiment_name(), run_name, tags,
                                 run_params(config, "tune"), config_name=run_name)
    with tracker.final_status(parent):
        ensure_ray(address)
        print(f"[tune] search: {len(t.strategies)} strategies x {tn.num_samples} settings, ASHA on validation loss", flush=True)
        searched = _tuner(config, inputs, _search_space(config, inputs), "search", tracker, parent, asha=True).fit()
        best = _best_settings(searched, t.strategies)
        print(f"[tune] repeats: best setting of each strategy x {tn.repeats} seeds and K-shot draws", flush=True)
        space = {"strategy": ray.tune.grid_search(list(best)), "repeat": ray.tune.grid_search(list(range(tn.repeats))),
                 **{k: ray.tune.sample_from(lambda trial, k=k: best[trial["strategy"]][k])
                    for k in ("lr", "partial_layers", "adapter_width", "steps", "eval_every")},
                 **_trial_scaling(config), "test": True,
                 "seed": ray.tune.sample_from(lambda trial: t.seed + 1000 * (1 + trial["repeat"]))}
        repeated = _tuner(config, inputs, space, "repeat", tracker, parent, asha=False).fit()
        rows, best_strategy = _summarise(repeated, list(best), metric, direction)
        _log_summary(tracker, parent, rows, metric, best_strategy)
    return parent, summary_header(metric), rows, best_strategy


def summary_header(metric: str) -> list[str]:
    """The columns of the repeats' table (and of tune/results.csv)."""
    return ["strategy", f"test_{metric}_mean", f"test_{metric}_ci95", f"val_{metric}_mean", f"val_{metric}_ci95",
            "repeats", "seconds"]


def _summarise(results, strategies: list[str], metric: str, direction: str) -> tuple[list[list], str]:
    """Rows of test and val mean +- CI per strategy; the best strategy by its mean val metric."""
    finals: dict[str, dict[str, list[float]]] = {s: {"test": [], "val": [], "seconds": []} for s in strategies}
    for result in results:
        if result.error is None and f"test/{metric}" in result.metrics:
            kept = finals[result.config["strategy"]]
            for key in ("test", "val"):
                kept[key].append(result.metrics[f"{key}/{metric}"])
            kept["seconds"].append(result.metrics["seconds"])
    rows = [[s, *mean_ci(f["test"]), *mean_ci(f["val"]), len(f["test"]), sum(f["seconds"]) / len(f["seconds"])]
            for s, f in finals.items() if f["test"]]
    pick = max if direction == "max" else min
    return rows, pick(rows, key=lambda r: r[3])[0]


def _log_summary(tracker: Tracker, parent: str, rows: list[list], metric: str, best: str) -> None:
    c = tracker.client()
    with tempfile.TemporaryDirectory() as d:
        csv = os.path.join(d, "results.csv")
        with open(csv, "w") as f:
            f.write(",".join(summary_header(metric)) + "\n")
            f.writelines(",".join(str(v) for v in row) + "\n" for row in rows)
        chart = report.bar_chart([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                 f"test {metric} (mean, 95% CI)", os.path.join(d, "results.png"))
        c.log_artifact(parent, csv, "tune")
        c.log_artifact(parent, chart, "tune")
    c.set_tag(parent, "mtml.best_strategy", best)
