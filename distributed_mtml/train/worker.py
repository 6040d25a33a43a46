"""The per-worker training loop that Ray Train runs on every rank.

Each rank owns some tasks (data, adapters, heads); the trunk is wrapped in DDP so its
gradients are averaged across ranks. All ranks take the same number of steps per epoch,
whatever their tasks' sizes, because every DDP backward and every `ray.train.report` is a
collective: a rank that stopped early would hang the others.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_mtml.data.suite import load_suite_spec, load_task
from distributed_mtml.models import TaskShape, build_task_modules, build_trunk, task_loss
from distributed_mtml.train.checkpoint import restore_worker_state, save_worker_state
from distributed_mtml.train.metrics import task_metrics
from distributed_mtml.train.plan import TrainPlan


class TaskBatches:
    """Endless shuffled mini-batches of one task's train split, reproducible per epoch.

    The permutation depends only on (seed, task index, epoch, pass), so a run resumed from
    a checkpoint sees the same batches it would have seen without the interruption.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, task_index: int):
        self.x, self.y, self.batch_size = x, y, min(batch_size, len(y))
        self.seed, self.task_index = seed, task_index

    def epoch(self, epoch: int, steps: int):
        order = np.empty(0, dtype=np.int64)
        needed, passes = steps * self.batch_size, 0
        while len(order) < needed:
            rng = np.random.default_rng([self.seed, self.task_index, epoch, passes])
            order = np.concatenate([order, rng.permutation(len(self.y))])
            passes += 1
        index = torch.from_numpy(order[:needed]).view(steps, self.batch_size).to(self.x.device)
        for rows in index:
            yield self.x[rows], self.y[rows]


def _optimizer(plan: TrainPlan, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = plan.config.training
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return kinds[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay)


def _average_parameters(module: nn.Module, world: int) -> None:
    """Local-SGD synchronisation: replace every rank's trunk by the mean over ranks."""
    flat = torch.cat([p.data.reshape(-1) for p in module.parameters()])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in module.parameters():
        p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _evaluate(trunk: nn.Module, modules: nn.ModuleDict, shapes: dict[str, TaskShape], data: dict, split: str) -> dict:
    trunk.eval(), modules.eval()
    out = {}
    with torch.no_grad():
        for name, module in modules.items():
            x, y = data[name][split]
            metrics = task_metrics(shapes[name], module.head(trunk(module.adapter(x))), y)
            out.update({f"{split}/{name}/{k}": v for k, v in metrics.items()})
    trunk.train(), modules.train()
    return out


def _quiet_report_log() -> None:
    """Ray Train logs every report's full metrics at INFO under a logger outside the
    `ray.train` tree, which `LoggingConfig` does not reach; the controller prints a
    one-line summary per epoch instead."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict) -> None:
    plan = TrainPlan.model_validate(payload)
    _quiet_report_log()
    cfg, t = plan.config, plan.config.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()

    shapes = {s.name: s for s in plan.task_shapes()}
    mine = plan.placement[rank]
    order = list(shapes)
    specs = {s.name: s for s in load_suite_spec(plan.suite_dir).tasks}
    data = {}
    for name in mine:
        d = load_task(plan.suite_dir, specs[name])
        data[name] = {s: (torch.from_numpy(d.x[s]).to(device), torch.from_numpy(d.y[s]).to(device)) for s in d.x}

    torch.manual_seed(t.seed)
    trunk = build_trunk(cfg.model, list(shapes.values())).to(device)
    modules = build_task_modules(cfg.model, list(shapes.values()), t.seed, only=mine).to(device)
    optimizer = _optimizer(plan, [*trunk.parameters(), *modules.parameters()])
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch = restore_worker_state(d, rank, trunk, modules, optimizer)
    synced = trunk
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        synced = DistributedDataParallel(trunk, device_ids=ids)
    batches = {n: TaskBatches(*data[n]["train"], t.batch_size, t.seed, order.index(n)) for n in mine}
    # Loss scale so the DDP mean over ranks is the mean over all tasks of the suite.
    scale = world / len(shapes)

    for epoch in range(start_epoch, t.epochs):
        torch.manual_seed(t.seed * 100_003 + epoch * 101 + rank)  # dropout, reproducible on resume
        sums = {n: 0.0 for n in mine}
        samples, begin = 0, time.perf_counter()
        streams = [batches[n].epoch(epoch, plan.steps_per_epoch) for n in mine]
        for step, group in enumerate(zip(*streams)):
            local_only = t.sync_every > 1 and world > 1
            with synced.no_sync() if local_only else contextlib.nullcontext():
                inputs = [modules[n].adapter(x) for n, (x, _) in zip(mine, group)]
                features = synced(torch.cat(inputs)).split([len(x) for x in inputs])
                losses = [
                    task_loss(shapes[n], modules[n].head(f), y) for n, f, (_, y) in zip(mine, features, group)
                ]
                optimizer.zero_grad(set_to_none=True)
                (torch.stack(losses).sum() * scale).backward()
            optimizer.step()
            if local_only and ((step + 1) % t.sync_every == 0 or step + 1 == plan.steps_per_epoch):
                _average_parameters(trunk, world)
            for n, loss in zip(mine, losses):
                sums[n] += loss.item()
            samples += sum(len(y) for _, y in group)
        train_seconds = time.perf_counter() - begin

        metrics = {f"train/{n}/loss": sums[n] / plan.steps_per_epoch for n in mine}
        metrics.update(_evaluate(trunk, modules, shapes, data, "val"))
        metrics.update({"epoch": epoch, "samples": samples, "train_seconds": train_seconds})
        last = epoch + 1 == t.epochs
        if (epoch + 1) % cfg.checkpoint.every_n_epochs == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                save_worker_state(d, rank, epoch, payload, trunk, modules, optimizer)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_dir_name=f"checkpoint_epoch={epoch:04d}",
                )
        else:
            ray.train.report(metrics)
