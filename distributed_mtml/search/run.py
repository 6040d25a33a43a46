"""`mtml tune` with a `search:` section: Ray Tune over the training itself, then honest repeats.

Stage 1, search: `tune.num_samples` settings drawn from `search.space` (per point of a `grid`),
each a real training run (`trial.py`), under one ASHA scheduler on the monitored validation
value, epoch by epoch; with `search.algorithm: optuna`, Optuna's sampler picks the settings.
Stage 2, repeats: the setting with the best kept validation value, trained again under
`tune.repeats` new seeds; only these runs score the test split. The table holds every search
trial's validation value and the repeats' validation and test means with 95% intervals; the
best repeat by validation is the parent run's model. Nothing is chosen on a test number.

Each trial takes `tune.cpus_per_trial` CPUs in local mode (`scaling.num_workers: 0`), so a laptop
runs several at once; with workers, a trial's TorchTrainer takes `scaling.cpus_per_worker` per
worker. Trials run on the command's Ray and write to its MLflow store: a parent run, a child run
per trial. `--resume` continues an interrupted search where Tune left it (Tune's restore).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from distributed_mtml import compat
from distributed_mtml.config import Config, flatten, run_params
from distributed_mtml.console import say, trials_progress
from distributed_mtml.errors import InputError
from distributed_mtml.search import summary
from distributed_mtml.search.space import base_of, parse, setting, trial_config, tune_space
from distributed_mtml.search.trial import RUN_ID, training_trial
from distributed_mtml.tracking import Tracker


def check(config: Config, where: str) -> dict[str, tuple[str, list]]:
    """Everything a search needs that can be wrong in its input, before Ray starts: the space,
    the search algorithm, and the suite and monitor as `mtml train` checks them."""
    from distributed_mtml.train.plan import make_plan

    space = parse(config, where)
    if config.search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise InputError(f"{where}: search.algorithm: optuna needs the optuna package: "
                             "pip install 'distributed_mtml[search]'") from None
        grids = [k for k, (kind, _) in space.items() if kind == "grid"]
        if grids:
            raise InputError(f"{where}: search.space.{grids[0]}: Optuna samples; a grid is for search.algorithm: random")
    make_plan(config)  # the suite, its tasks and the monitor, as every trial will find them
    return space


def _tuner(config: Config, space: dict[str, Any], stage: str, tracker: Tracker, parent: str, run_name: str,
           restore: str | None = None):
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    tn, local = config.tune, config.scaling.local
    base = base_of(config)
    driver_cpus = tn.cpus_per_trial if local else 0.01  # with workers, a trial's driver only waits on them
    per_trial = driver_cpus + (0 if local else config.scaling.cpus_per_worker * config.scaling.max_workers)
    # local-mode trials: as many at once as their CPUs allow, all made at the start (a trial Tune has
    # not yet made when the search is interrupted would be lost to --resume); a trial on workers
    # holds almost no CPU itself, so those are limited to what the workers' CPUs allow
    concurrent = tn.max_concurrent_trials or \
        (None if local else max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial)))
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(training_trial, base=base, parent=parent, stage=stage, uri=tracker.uri,
                                 name=run_name), {"cpu": driver_cpus})
    if restore is not None:
        return ray.tune.Tuner.restore(restore, trainable, resume_unfinished=True, resume_errored=False)
    searching = stage == "search"
    # max_t one past the last epoch: a trial ASHA keeps ends by returning, never by a stop on its last report
    scheduler = ASHAScheduler(time_attr="epochs_done", max_t=config.training.epochs + 1,
                              grace_period=tn.grace_period) if searching else None
    algorithm = None
    if searching and config.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines are not the search's progress
        algorithm = OptunaSearch(seed=config.training.seed)
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(metric="monitor", mode=config.checkpoint.mode, scheduler=scheduler,
                                        search_alg=algorithm, num_samples=tn.num_samples if searching else 1,
                                        max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=ray.tune.RunConfig(name=_experiment(stage, parent), storage_path=config.checkpoint.resolved_dir(),
                                      verbose=0, callbacks=[_child_runs(tracker, stage, _trials(config, space, stage))]),
    )


def _trials(config: Config, space: dict[str, Any], stage: str) -> int:
    """How many trials the stage has: the samples times every grid's values (a repeat: one each)."""
    grids = [len(d["grid_search"]) for d in space.values() if isinstance(d, dict) and "grid_search" in d]
    return (config.tune.num_samples if stage == "search" else 1) * math.prod(grids)


def _experiment(stage: str, parent: str) -> str:
    return f"{stage}-{parent[:12]}"


def _child_runs(tracker: Tracker, stage: str, total: int):
    """The Tune driver's view of each trial's MLflow run: a trial ASHA stopped (it ended without
    its last result) is tagged `mtml.stopped_by` and FINISHED (where its own process did not
    get to end it); a failed trial's run FAILED."""
    import ray.tune

    class ChildRuns(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED")
            trials_progress(stage, trials, trial, total)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")
            trials_progress(stage, trials, trial, total)

        @staticmethod
        def _end(trial, status: str) -> None:
            result = trial.last_result or {}
            run_id = result.get(RUN_ID)
            if run_id is None:
                return
            if status == "FINISHED" and "kept" not in result:
                tracker.client().set_tag(run_id, "mtml.stopped_by", "ASHA")
            if tracker.client().get_run(run_id).info.status == "RUNNING":
                tracker.set_status(run_id, status)

    return ChildRuns()


def _searched(results, keys: list[str], mode: str) -> list[dict]:
    """Each search trial: its setting, kept validation value (nan: it failed; ASHA stopped it:
    its best epoch's so far, by `mode`), the epochs it ran and its seconds."""
    out = []
    for result in results:
        metrics = result.metrics or {}
        values = {k: result.config[k] for k in keys}
        kept = metrics.get("kept", math.nan) if result.error is None else math.nan
        stopped = result.error is None and "kept" not in metrics
        history = result.metrics_dataframe
        epochs = history.get("epochs_done") if history is not None else None
        if stopped and history is not None and len(history):
            kept = float(history["monitor"].min() if mode == "min" else history["monitor"].max())
        out.append({"values": values, "setting": setting(values), "kept": kept, "stopped": stopped,
                    "epochs": float(epochs.max()) if epochs is not None and epochs.notna().any() else math.nan,
                    "seconds": metrics.get("time_total_s", math.nan)})
    return out


def _best(trials: list[dict], mode: str) -> dict:
    """The best kept validation value among the trials that ran to the end (ASHA's stopped ones
    only if none did: their values are from fewer epochs)."""
    scored = [t for t in trials if not math.isnan(t["kept"]) and not t["stopped"]] or \
        [t for t in trials if not math.isnan(t["kept"])]
    if not scored:
        raise RuntimeError("every search trial failed: see the failed child runs in MLflow")
    return (min if mode == "min" else max)(scored, key=lambda t: t["kept"])


def run_search(config: Config, where: str, tracker: Tracker, run_name: str, address: str | None = None,
               register: str | None = None, resume: bool = False) -> tuple[str, list[list], str]:
    """Search, repeat, summarise; returns (parent run id, table rows, best setting)."""
    import ray.tune

    from distributed_mtml.runtime.cluster import ensure_ray

    space = check(config, where)
    # Ctrl-C ends the whole command (KILLED); Tune's own tables and banners stay out of the terminal;
    # Tune saves the search's state every second (not every 10 s), so that --resume finds each
    # trial that ended before an interrupt as ended, and does not train it again
    compat.set_environment(TUNE_DISABLE_SIGINT_HANDLER="1", RAY_AIR_NEW_OUTPUT="0", TUNE_GLOBAL_CHECKPOINT_S="1")
    parent = _parent_run(config, tracker, run_name, space, resume)
    storage = config.checkpoint.resolved_dir()
    with tracker.final_status(parent):
        ensure_ray(address)
        say(f"[tune] search: {config.tune.num_samples} settings of {', '.join(space)}, ASHA on {config.checkpoint.monitor}")
        restore = _restorable(storage, "search", parent) if resume else None
        searched = _tuner(config, tune_space(space), "search", tracker, parent, run_name, restore).fit()
        trials = _searched(searched, list(space), config.checkpoint.mode)
        best = _best(trials, config.checkpoint.mode)
        say(f"[tune] best by validation: {best['setting']} ({config.checkpoint.monitor} {best['kept']:.4g}); "
            f"{config.tune.repeats} repeats with new seeds")
        seeds = [config.training.seed + 1000 * (r + 1) for r in range(config.tune.repeats)]
        repeat_space = {**best["values"], "training.seed": ray.tune.grid_search(seeds)}
        restore = _restorable(storage, "repeat", parent) if resume else None
        repeated = _tuner(config, repeat_space, "repeat", tracker, parent, run_name, restore).fit()
        rows = summary.search_rows(trials, config.checkpoint.mode) + [_repeat_row(repeated, best["setting"])]
        _log_results(tracker, parent, rows, best, repeated, config, register)
    tracker.client().set_tag(parent, "mtml.best_setting", best["setting"][:5000])
    return parent, rows, best["setting"]


def _parent_run(config: Config, tracker: Tracker, run_name: str, space: dict, resume: bool) -> str:
    experiment = config.tracking.experiment
    if resume:
        parent = tracker.find_resumable_run(experiment, run_name)
        if parent is None:
            raise InputError(f"--resume: no unfinished search of config '{run_name}' in experiment '{experiment}'")
        say(f"[tune] resuming search {parent}")
        tracker.set_status(parent, "RUNNING")
        return parent
    params = {**run_params(config, "train"), **flatten({"search": {"algorithm": config.search.algorithm}}),
              **{f"search.space.{k}": f"{kind} {args}" for k, (kind, args) in space.items()},
              **{f"tune.{k}": v for k, v in config.tune.model_dump().items()}}
    tags = {"mtml.command": "tune", "mtml.search": "training"}
    return tracker.create_run(experiment, run_name, tags, params, config_name=run_name)


def _restorable(storage: str, stage: str, parent: str) -> str | None:
    import ray.tune

    path = os.path.join(storage, _experiment(stage, parent))
    return path if ray.tune.Tuner.can_restore(path) else None


def _repeat_row(results, best_setting: str) -> list:
    done = [r.metrics for r in results if r.error is None and "test" in (r.metrics or {})]
    return summary.repeat_row(best_setting, [m["kept"] for m in done], [m["test"] for m in done],
                              [m["seconds"] for m in done])


def _log_results(tracker: Tracker, parent: str, rows: list[list], best: dict, repeated, config: Config,
                 register: str | None) -> None:
    """The table (`search/results.csv`), the repeats' means as the parent's metrics, and the best
    repeat's model (by validation) as the parent's model."""
    from distributed_mtml.model_log import input_example, log_mlflow_model
    from distributed_mtml.train.plan import make_plan

    c = tracker.client()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.csv")
        with open(path, "w") as f:
            f.write(summary.to_csv(rows))
        c.log_artifact(parent, path, "search")
    repeat = rows[-1]
    tracker.log_metrics(parent, {k: v for k, v in {"repeats/val_mean": repeat[3], "repeats/test_mean": repeat[5]}.items()
                                 if not math.isnan(v)}, step=0)
    done = [r for r in repeated if r.error is None and "checkpoint" in (r.metrics or {})]
    if not done:
        return
    pick = (min if config.checkpoint.mode == "min" else max)(done, key=lambda r: r.metrics["kept"])
    plan = make_plan(trial_config(base_of(config), {**best["values"], "training.seed": pick.config["training.seed"]}))
    example = input_example(plan.suite_dir, plan.features)
    log_mlflow_model(tracker, parent, pick.metrics["checkpoint"], example, 0, register)
    c.set_tag(parent, "mtml.best_run", pick.metrics[RUN_ID])
