"""Helpers shared by the benchmark scripts: run a config through the real system and
read its results back from MLflow, so a benchmark measures what users run."""

from __future__ import annotations

import os
import tempfile

from distributed_mtml.config import Config, validate_config
from distributed_mtml.runtime.cluster import ensure_ray
from distributed_mtml.runtime.driver import TrainOutcome
from distributed_mtml.tracking import Tracker
from distributed_mtml.train.launch import run_training

WORKDIR = tempfile.mkdtemp(prefix="mtml_bench_")
URI = f"sqlite:///{WORKDIR}/mlflow.db"
TRACKER = Tracker(URI)


def config(**sections) -> Config:
    """A config with benchmark defaults: checkpoints only at the end, in a scratch dir."""
    raw: dict = {"checkpoint": {"every_n_epochs": 1000, "dir": os.path.join(WORKDIR, "runs")},
                 "tracking": {"experiment": "benchmarks"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_config(raw)


def train(cfg: Config, name: str) -> TrainOutcome:
    ensure_ray(None)
    return run_training(cfg, name, TRACKER)


def best_throughput(outcome: TrainOutcome) -> float:
    """Best samples/s over the epochs after the first (which pays for warm-up): the same
    best-of-N estimator as `loop_throughput`, robust to a noisy machine."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(URI).get_metric_history(outcome.run_id, "throughput/samples_per_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    return max(values[1:] or values)


def loop_throughput(cfg: Config, threads: int, steps: int, repeats: int = 3) -> float:
    """Samples/s of one process training every task of the suite with `threads` threads,
    using the same step function, model and batches as a worker. Best of `repeats` runs of
    `steps` steps, after a warm-up, since this machine is noisy."""
    import time

    import torch

    from distributed_mtml.data.tasks import load_suite_spec, load_task
    from distributed_mtml.models import build_task_modules, build_trunk, head_parameters
    from distributed_mtml.runtime.worker import make_optimizer
    from distributed_mtml.train.plan import make_plan
    from distributed_mtml.train.step import TaskBatches, multitask_step

    plan = make_plan(cfg)
    t = cfg.training
    shapes = {s.name: s for s in plan.task_shapes()}
    specs = load_suite_spec(plan.suite_dir).tasks
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(t.seed)
    trunk = build_trunk(cfg.model, list(shapes.values()))
    modules = build_task_modules(cfg.model, list(shapes.values()), t.seed)
    optimizer = make_optimizer(t.optimizer, [*trunk.parameters(), *head_parameters(modules)], t.lr, t.weight_decay)
    batches = {}
    for i, spec in enumerate(specs):
        d = load_task(plan.suite_dir, spec)
        batches[spec.name] = TaskBatches(torch.from_numpy(d.x["train"]), torch.from_numpy(d.y["train"]), t.batch_size, t.seed, i)
    best = 0.0
    for r in range(repeats + 1):
        streams = [batches[n].epoch(r, steps) for n in shapes]
        begin, samples = time.perf_counter(), 0
        for group in zip(*streams):
            multitask_step(trunk, modules, shapes, dict(zip(shapes, group)), optimizer, 1 / len(shapes))
            samples += sum(len(y) for _, y in group)
        if r > 0:  # the first pass is warm-up
            best = max(best, samples / (time.perf_counter() - begin))
    torch.set_num_threads(previous)
    return best


def single_task_suite(suite_dir: str, task: str) -> str:
    """A suite holding only `task`, pointing at the same Parquet file: the single-task baseline."""
    return subset_suite(suite_dir, [task])


def subset_suite(suite_dir: str, tasks: list[str]) -> str:
    """A suite holding only `tasks`, pointing at the same Parquet files (held-out splits of tasks)."""
    import yaml

    from distributed_mtml.data.suite import SuiteSpec, join_path, suite_yaml_path, write_text
    from distributed_mtml.data.tasks import load_suite_spec

    spec = load_suite_spec(suite_dir)
    chosen = [t.model_copy(update={"path": join_path(suite_dir, t.path)}) for t in spec.tasks if t.name in tasks]
    out = os.path.join(WORKDIR, "subsets", f"{os.path.basename(suite_dir)}-{'-'.join(tasks)}")
    subset = SuiteSpec(name=f"{spec.name}-{'-'.join(tasks)}", tasks=chosen)
    write_text(suite_yaml_path(out), yaml.safe_dump(subset.model_dump(exclude_none=True), sort_keys=False))
    return out


def test_metrics(outcome: TrainOutcome, suite_dir: str) -> dict[str, float]:
    from distributed_mtml.artifacts import model_from_run
    from distributed_mtml.evaluate import evaluate

    return evaluate(model_from_run(outcome.run_id, TRACKER), suite_dir)
