"""The driver every training command shares: start or join Ray, check resources, create or resume
the MLflow run, fit the TorchTrainer with the controller's MLflow callback, keep the best
checkpoint, and set the run's final status (FINISHED, KILLED on Ctrl-C, FAILED otherwise).

A recipe (`train/launch.py`, `meta/launch.py`) plans its run, describes it as a `RunSpec` and
calls `launch`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import yaml

from distributed_mtml import console, faults
from distributed_mtml.config import Config, run_params
from distributed_mtml.data.suite import join_path, load_suite_spec, read_text, suite_yaml_path
from distributed_mtml.errors import InputError, TrainingFailed
from distributed_mtml.interrupts import interrupt_trainer_on_sigint
from distributed_mtml.runtime import memory
from distributed_mtml.runtime.callback import (
    MetricSpool,
    MLflowMetricsCallback,
    fail_fast,
    spool_path,
    worker_error_summary,
)
from distributed_mtml.runtime.checkpoint import check_resumable, check_writable, latest_checkpoint, load_state
from distributed_mtml.runtime.local import LocalRun
from distributed_mtml.runtime.monitor import SCORE
from distributed_mtml.tracking import Tracker

if TYPE_CHECKING:
    import pyarrow as pa


VERBOSE_ENV = "MTML_VERBOSE"  # set by `--verbose`: Ray's own log lines in the terminal too


@dataclass
class TrainOutcome:
    run_id: str
    tracker: Tracker
    metrics: dict[str, float]  # the run's MLflow metrics (latest value of each)
    checkpoint_path: str  # the kept model: the best checkpoint by checkpoint.monitor
    kept: dict[str, float]  # what the workers reported at the kept model's step
    best_step: int  # its epoch (meta: iterations done)
    stopped_early: bool


def start_or_resume_run(
    cfg: Config, tracker: Tracker, run_name: str, resume: bool, tags: dict[str, str], plan_params: dict
) -> tuple[str, str]:
    """(MLflow run id, Ray Train run name). The Ray name is derived from the MLflow run, so a
    resumed run finds both its metrics and its checkpoints again."""
    if resume:
        run_id = tracker.find_resumable_run(cfg.tracking.experiment, run_name)
        if run_id is None:
            raise InputError(f"--resume: no unfinished run of config '{run_name}' in experiment '{cfg.tracking.experiment}'")
        last = check_resumable(cfg.checkpoint.resolved_dir(), f"{run_name}-{run_id[:12]}", cfg.model.model_dump(mode="json"))
        name = tracker.client().get_run(run_id).info.run_name
        print(f"[mtml] resuming run {run_id} ('{name}') {_resume_point(last)}", flush=True)
        tracker.set_status(run_id, "RUNNING")
    else:
        params = {**run_params(cfg, tags["mtml.command"]), **{f"plan.{k}": v for k, v in plan_params.items()}}
        run_id = tracker.create_run(cfg.tracking.experiment, run_name, tags, params, config_name=run_name)
    return run_id, f"{run_name}-{run_id[:12]}"


def _resume_point(last: str | None) -> str:
    """Where a resumed run continues from its newest checkpoint `last`: 'after epoch N
    (checkpoint ...)', or from the start."""
    if last is None:
        return "from the start: it wrote no checkpoint"
    if "://" in last:
        return f"from {last}"
    state = load_state(last)
    done = state.get("iterations_done")
    where = f"after iteration {done}" if done is not None else f"after epoch {int(state['epoch']) + 1}"
    return f"{where} (checkpoint {last})"


def make_trainer(loop, payload: dict, cfg: Config, ray_name: str, callback, terminal: str,
                 datasets: dict[str, Callable] | None = None):
    """A TorchTrainer with the config's scaling, storage, failure and checkpoint settings; its
    workers say their lines through the console actor `terminal`. `datasets` (streamed tasks'
    Ray datasets, built in the controller) go to every worker unsplit: each is read only by the
    rank that owns its task, whole."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    return TorchTrainer(
        loop,
        train_loop_config=payload,
        torch_config=TorchConfig(timeout_s=600),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=worker_resources(cfg), placement_strategy=s.placement_strategy,
            elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=cfg.checkpoint.resolved_dir(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep, checkpoint_score_attribute=SCORE,
                checkpoint_score_order=cfg.checkpoint.mode),
            callbacks=[callback] if callback is not None else [],
            worker_runtime_env={"env_vars": {**faults.fault_env(), console.ENV: terminal,
                                             **(memory.system_arrow_pool() if datasets else {})}},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def log_run_files(tracker: Tracker, run_id: str, cfg: Config, suite_dir: str | None) -> None:
    """The config, the suite description, and each task of the suite as a dataset input."""
    c = tracker.client()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        c.log_artifact(run_id, os.path.join(d, "config.yaml"))
        if suite_dir is not None:
            with open(os.path.join(d, "suite.yaml"), "w") as f:
                f.write(read_text(suite_yaml_path(suite_dir)))
            c.log_artifact(run_id, os.path.join(d, "suite.yaml"))
    if suite_dir is not None:
        tracker.log_datasets(run_id, suite_datasets(suite_dir))


def suite_datasets(suite_dir: str) -> list[tuple[str, str, str, pa.Schema]]:
    """(name, source URI, digest, schema) of each task's files: what trained the run."""
    from distributed_mtml.data.scan import fingerprint, open_task

    out = []
    for task in load_suite_spec(suite_dir).tasks:
        source = join_path(suite_dir, task.path)
        out.append((task.name, source, fingerprint(suite_dir, task), open_task(suite_dir, task).schema))
    return out


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one worker takes from the cluster."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}), **s.worker_resources}


READ_CPUS = 1.0  # what streamed tasks' Ray Data reads need beside the workers: with none free,
# Ray Data's CPU budget is zero and the first read never starts (a silent hang)


def cpus_needed(cfg: Config, streams: bool) -> float:
    """The fewest workers' CPUs, and one for Ray Data's reads when some task is streamed."""
    return cfg.scaling.min_workers * cfg.scaling.cpus_per_worker + (READ_CPUS if streams else 0.0)


def resources_needed(cfg: Config, streams: bool) -> dict[str, float]:
    """What the cluster must hold for the run to go on: its fewest workers (and Ray Data's reads)."""
    need = {k: v * cfg.scaling.min_workers for k, v in worker_resources(cfg).items()}
    return {**need, "CPU": cpus_needed(cfg, streams)}


def missing_resources(cfg: Config, streams: bool) -> dict[str, tuple[float, float]]:
    """resource -> (needed, in the cluster) for each the cluster's live nodes lack."""
    import ray

    have = ray.cluster_resources()
    return {k: (v, have.get(k, 0.0)) for k, v in resources_needed(cfg, streams).items() if have.get(k, 0.0) < v}


def _described(missing: dict[str, tuple[float, float]]) -> tuple[str, str]:
    """('2 CPU, 1 GPU' wanted, '1 CPU, 0 GPU' present)."""
    return (", ".join(f"{need:g} {k}" for k, (need, _) in missing.items()),
            ", ".join(f"{have:g} {k}" for k, (_, have) in missing.items()))


def check_local_resources(cfg: Config, address: str | None, streams: bool = False) -> None:
    """A command that starts its own Ray can only use this machine's CPUs and GPUs: workers
    asking for more would wait for ever. A cluster's autoscaler may add nodes, so there
    `wait_for_resources` gives it `scaling.resource_wait_s` instead."""
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    from ray._private.utils import get_num_cpus

    s = cfg.scaling
    need, have = cpus_needed(cfg, streams), get_num_cpus()
    reads = f" + {READ_CPUS:g} for Ray Data's reads of the streamed tasks" if streams else ""
    if need > have:
        raise InputError(f"scaling.num_workers: {s.min_workers} workers x {s.cpus_per_worker:g} CPU{reads} need {need:g} "
                         f"CPUs; this machine has {have} (use fewer workers or cpus_per_worker, or --address a cluster)")
    if s.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if s.min_workers > gpus:
            raise InputError(f"scaling.use_gpu: {s.min_workers} workers need {s.min_workers} GPUs; this machine has "
                             f"{gpus} (set scaling.use_gpu: false, use fewer workers, or --address a cluster with GPUs)")


def wait_for_resources(cfg: Config, streams: bool = False) -> None:
    """The workers' CPUs (and GPUs) must be in the cluster before the trainer asks for them, or
    it waits silently for ever. An autoscaling cluster gets `scaling.resource_wait_s` to add
    nodes; then the run fails saying what is missing."""
    import time

    s = cfg.scaling
    deadline, said = time.monotonic() + s.resource_wait_s, False
    while missing := missing_resources(cfg, streams):
        wanted, present = _described(missing)
        if time.monotonic() > deadline:
            raise TrainingFailed(f"the cluster did not provide {wanted} for {s.min_workers} workers within "
                                 f"scaling.resource_wait_s={s.resource_wait_s:g} s (it has {present})")
        if not said:
            print(f"[mtml] waiting up to {s.resource_wait_s:g} s for the cluster to provide {wanted}", flush=True)
            said = True
        time.sleep(min(2.0, s.resource_wait_s))


class ResourceWatch:
    """While the trainer runs, the cluster must keep what its fewest workers need. After a lost
    node Ray Train waits, without a word, for the resources to restart the group; if they are
    missing for `scaling.resource_wait_s`, this says so and aborts the run (`expired`)."""

    def __init__(self, cfg: Config, streams: bool, abort: Callable[[], None], every_s: float = 2.0):
        import threading

        self.cfg, self.streams, self.abort, self.every_s = cfg, streams, abort, every_s
        self.expired: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="mtml-resource-watch", daemon=True)

    def __enter__(self) -> "ResourceWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        import time

        wait, since = self.cfg.scaling.resource_wait_s, None
        while not self.stop.wait(self.every_s):
            try:
                missing = missing_resources(self.cfg, self.streams)
            except Exception:  # noqa: BLE001 - the GCS busy with a dead node: look again next time
                continue
            if not missing:
                since = None
                continue
            wanted, present = _described(missing)
            if since is None:
                since = time.monotonic()
                print(f"[mtml] the cluster lost resources: {self.cfg.scaling.min_workers} workers need {wanted}, "
                      f"it has {present}; waiting up to {wait:g} s (scaling.resource_wait_s)", flush=True)
            if time.monotonic() - since >= wait:
                self.expired = (f"the cluster has had {present} for {wait:g} s (scaling.resource_wait_s), "
                                f"{self.cfg.scaling.min_workers} workers need {wanted}")
                self.abort()
                return


def ensure_ray(address: str | None) -> None:
    """Joins the cluster at `address`, or starts a local Ray inside this process, saying which
    (the first seconds are otherwise silent). Ray's own driver-side log lines (token auth,
    dashboard address) are for `--verbose`; they stay in Ray's session logs either way."""
    import logging

    import ray

    from distributed_mtml.interrupts import interrupt_on_signals

    if ray.is_initialized():
        return
    where = address or os.environ.get("RAY_ADDRESS")
    print(f"[mtml] joining the Ray cluster at {where} ..." if where else "[mtml] starting a local Ray ...", flush=True)
    verbose = os.environ.get(VERBOSE_ENV) == "1"  # actors' output too: see `console`
    ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
    interrupt_on_signals()  # ray.init replaced it with Ray's own (log and abort)


@dataclass
class RunSpec:
    """What differs between `mtml train` and `mtml meta-train` runs; `launch` does the rest."""

    tags: dict[str, str]
    plan_params: dict
    loop: Callable[[dict], None]  # the Ray Train loop per worker
    payload: dict  # its plan, as JSON
    total: int  # epochs or meta-iterations, for the progress line
    counter: str  # "epoch" or "iteration": the MLflow step of every metric
    log_artifacts: Callable[[Tracker, str, str, int], None]  # (tracker, run id, kept checkpoint dir, its step)
    datasets: dict[str, Callable] = field(default_factory=dict)  # name -> a function making a Ray dataset


def _stop(controllers: list) -> None:
    """Ends the Train controller at once (its workers go with it): one waiting for resources that
    will not come does not get to run an `abort` call."""
    import ray

    for controller in controllers:
        ray.kill(controller, no_restart=True)


def _fit(trainer, config: Config, ray_name: str, streams: bool):
    """trainer.fit(), with a failure of the worker group told in one line: which rank failed
    and how (or which resources the cluster lost), and the checkpoint `--resume` continues from."""
    from ray.train import TrainingFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    def resume() -> str:
        last = latest_checkpoint(config.checkpoint.resolved_dir(), ray_name)
        return f"last checkpoint {last} (continue with --resume)" if last else "no checkpoint was written"

    with interrupt_trainer_on_sigint(trainer) as controllers:
        watch = ResourceWatch(config, streams, lambda: _stop(controllers))
        try:
            with watch:
                return trainer.fit()
        except Exception as e:
            if watch.expired:
                raise TrainingFailed(f"training stopped: {watch.expired}; {resume()}") from e
            if not isinstance(e, TrainingFailedError):
                raise
            what = worker_error_summary(e.worker_failures) if isinstance(e, WorkerGroupError) \
                else " ".join(str(e).split())[:300]
            tries = f" after {config.checkpoint.max_failures} restarts" if config.checkpoint.max_failures > 0 else ""
            raise TrainingFailed(f"training failed{tries}: {what}; {resume()}") from e


def _fit_local(spec: RunSpec, config: Config, ray_name: str, callback: MLflowMetricsCallback, address: str | None):
    """The training function in this process (`scaling.num_workers: 0`), through Ray Train's
    local mode; `LocalRun` logs and keeps checkpoints as the controller would. Ray starts only
    for Ray Data, when a task is streamed."""
    if spec.datasets:
        ensure_ray(address)
    c = config.checkpoint
    with LocalRun(c.resolved_dir(), ray_name, callback, c.num_to_keep, c.mode) as run:
        make_trainer(spec.loop, spec.payload, config, ray_name, None, "", spec.datasets).fit()
        return run.result()


def _send_kept_metrics(tracker: Tracker, run_id: str, spool: str, checkpoint: str, wait_s: float = 120) -> None:
    """What the tracking server missed during training, sent now, trying every 2 s for up to
    `wait_s`. If it still does not answer, the run cannot be closed: say where the model and
    the unsent metrics are."""
    import time

    kept = MetricSpool.load(spool)
    deadline = time.monotonic() + wait_s
    with fail_fast():
        while True:
            try:
                return kept.send(tracker, run_id)
            except Exception as e:  # noqa: BLE001 - any client error means the same to the user
                if time.monotonic() > deadline:
                    raise TrainingFailed(
                        f"training finished but the tracking server {tracker} does not answer "
                        f"({str(e).splitlines()[0][:160]}): the model is in {checkpoint}, "
                        f"{len(kept.reports)} unsent report(s) in {spool}") from None
                time.sleep(2)


def launch(config: Config, run_name: str, spec: RunSpec, tracker: Tracker, resume: bool,
           address: str | None) -> TrainOutcome:
    """Creates (or resumes) the MLflow run, fits the TorchTrainer, logs the artifacts from its
    last checkpoint and sets the run's final status: FINISHED, KILLED on Ctrl-C, FAILED on
    anything else."""
    if config.scaling.local and "://" in config.checkpoint.resolved_dir():
        raise InputError(f"checkpoint.dir: {config.checkpoint.resolved_dir()} is not on this machine; scaling.num_workers: 0 "
                         "keeps its checkpoints here (a local path)")
    check_local_resources(config, address, bool(spec.datasets))
    check_writable(config.checkpoint.resolved_dir())
    run_id, ray_name = start_or_resume_run(config, tracker, run_name, resume, spec.tags, spec.plan_params)
    spool = spool_path(config.checkpoint.resolved_dir(), ray_name)
    terminal = None if config.scaling.local else f"mtml-console-{ray_name}"  # local: this process prints
    callback = MLflowMetricsCallback(tracker, run_id, spec.total, spec.counter, config.checkpoint.max_failures,
                                              spool, terminal)
    with tracker.final_status(run_id):
        if config.scaling.local:
            result = _fit_local(spec, config, ray_name, callback, address)
        else:
            ensure_ray(address)
            wait_for_resources(config, bool(spec.datasets))
            with console.relay(terminal):
                result = _fit(make_trainer(spec.loop, spec.payload, config, ray_name, callback, terminal, spec.datasets),
                              config, ray_name, bool(spec.datasets))
        _send_kept_metrics(tracker, run_id, spool, result.checkpoint.path)
        kept, kept_metrics = best_checkpoint(result, config.checkpoint.mode)
        best_step = _log_kept(tracker, run_id, config, spec.counter, result.metrics, kept_metrics)
        memory.hold_mmap_threshold()  # no training follows here: the test split's reading and scoring stay bounded
        with kept.as_directory() as d:
            spec.log_artifacts(tracker, run_id, d, best_step)
    metrics = tracker.client().get_run(run_id).data.metrics
    return TrainOutcome(run_id, tracker, metrics, kept.path, kept_metrics, best_step, bool(result.metrics.get("stopped_early")))


def best_checkpoint(result, mode: str):
    """(checkpoint, its reported metrics) with the best monitored value; Ray Train kept it (it
    keeps the best `num_to_keep` by that score, and the latest). Ties go to the earliest."""
    scored = [(c, m) for c, m in result.best_checkpoints if SCORE in m]
    if not scored:  # checkpoints written before the monitor existed
        return result.checkpoint, result.metrics
    return min(scored, key=lambda cm: (cm[1][SCORE] if mode == "min" else -cm[1][SCORE], cm[1].get("best_step", 0)))


def _log_kept(tracker: Tracker, run_id: str, config: Config, counter: str, latest: dict, kept: dict) -> int:
    """Says which model the run kept: tag mtml.best_<counter>, metric best/<monitor>, and
    mtml.stopped_early. Returns the kept step."""
    step = int(kept.get("best_step", kept.get(counter, -1)))
    c = tracker.client()
    c.set_tag(run_id, f"mtml.best_{counter}", str(step))
    c.set_tag(run_id, "mtml.stopped_early", "true" if latest.get("stopped_early") else "false")
    if SCORE in kept:
        tracker.log_metrics(run_id, {f"best/{config.checkpoint.monitor}": kept[SCORE]}, step)
    return step


