"""The Ray cluster a command runs on: start or join it, check that it holds what the workers
need before they ask (a request the cluster cannot meet waits silently for ever), and watch that
it keeps holding it while they run."""

from __future__ import annotations

import os
from typing import Callable

from distributed_mtml import compat
from distributed_mtml.config import Config
from distributed_mtml.errors import InputError, TrainingFailed
from distributed_mtml.tracking import credentials_env

VERBOSE_ENV = "MTML_VERBOSE"  # set by `--verbose`: Ray's own log lines in the terminal too


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
    login = credentials_env()  # the Train controller and Tune's trials log to MLflow from Ray's processes
    ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose,
             runtime_env={"env_vars": login} if login else None)
    interrupt_on_signals()  # ray.init replaced it with Ray's own (log and abort)

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
    s = cfg.scaling
    need, have = cpus_needed(cfg, streams), compat.ray_cpu_count()
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
