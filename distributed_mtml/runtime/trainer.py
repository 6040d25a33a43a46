"""The TorchTrainer of a run: built from the config, fitted with Ctrl-C and lost resources
handled, its failures told in one line with the checkpoint to resume from; or the same training
function in this process (local mode). And which of its checkpoints is the kept model."""

from __future__ import annotations

from typing import Callable

from distributed_mtml import compat, console, faults
from distributed_mtml.config import Config
from distributed_mtml.errors import TrainingFailed
from distributed_mtml.interrupts import interrupt_trainer_on_sigint
from distributed_mtml.runtime.callback import MLflowMetricsCallback, worker_error_summary
from distributed_mtml.runtime.checkpoint import latest_checkpoint
from distributed_mtml.runtime.cluster import ResourceWatch, ensure_ray, worker_resources
from distributed_mtml.runtime.local import LocalRun
from distributed_mtml.runtime.monitor import SCORE


def make_trainer(loop, payload: dict, cfg: Config, ray_name: str, callback, terminal: str,
                 datasets: dict[str, Callable] | None = None, more_callbacks: list | None = None):
    """A TorchTrainer with the config's scaling, storage, failure and checkpoint settings; its
    workers say their lines through the console actor `terminal`. `datasets` (streamed tasks'
    Ray datasets, built in the controller) go to every worker unsplit: each is read only by the
    rank that owns its task, whole. `more_callbacks`: a search trial's report to Tune."""
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
            callbacks=([callback] if callback is not None else []) + (more_callbacks or []),
            worker_runtime_env={"env_vars": {**faults.fault_env(), console.ENV: terminal,
                                             **(compat.system_arrow_pool() if datasets else {})}},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )

def _stop(controllers: list) -> None:
    """Ends the Train controller at once (its workers go with it): one waiting for resources that
    will not come does not get to run an `abort` call."""
    import ray

    for controller in controllers:
        ray.kill(controller, no_restart=True)

def fit(trainer, config: Config, ray_name: str, streams: bool):
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

def fit_local(loop: Callable[[dict], None], payload: dict, datasets: dict[str, Callable], config: Config,
              ray_name: str, callback: MLflowMetricsCallback, address: str | None):
    """The training function in this process (`scaling.num_workers: 0`), through Ray Train's
    local mode; `LocalRun` logs and keeps checkpoints as the controller would. Ray starts only
    for Ray Data, when a task is streamed."""
    if datasets:
        ensure_ray(address)
    c = config.checkpoint
    with LocalRun(c.resolved_dir(), ray_name, callback, c.num_to_keep, c.mode) as run:
        make_trainer(loop, payload, config, ray_name, None, "", datasets).fit()
        return run.result()


def best_checkpoint(result, mode: str):
    """(checkpoint, its reported metrics) with the best monitored value; Ray Train kept it (it
    keeps the best `num_to_keep` by that score, and the latest). Ties go to the earliest."""
    scored = [(c, m) for c, m in result.best_checkpoints if SCORE in m]
    if not scored:  # checkpoints written before the monitor existed
        return result.checkpoint, result.metrics
    return min(scored, key=lambda cm: (cm[1][SCORE] if mode == "min" else -cm[1][SCORE], cm[1].get("best_step", 0)))
