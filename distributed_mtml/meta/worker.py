"""The meta-training loop that Ray Train runs on every rank.

Each rank draws its share of every meta-batch (a contiguous share of a family's episodes, or
the episodes of the suite tasks it owns), adapts all of them in one batched call, and
contributes its tasks' sum of meta-gradients; one all-reduce of the flat gradient in Ray
Train's process group gives every rank the meta-batch mean, and each steps the same outer
optimiser. Episode j of iteration i is drawn from its own stream (seed, j, i), so the meta-batch
is the same whatever the worker count: an elastic run that lost a worker computes what the
full group would have. DDP is not used: it cannot carry the second-order gradients MAML needs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from distributed_mtml import compat
from distributed_mtml.collective import sum_grads, summed
from distributed_mtml.console import progress_line, say
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.faults import FaultInjector, FiniteLossGuard
from distributed_mtml.meta.algorithms import META_TASK, adaptation_curve, meta_gradient
from distributed_mtml.meta.checkpoint import build_learner, restore_meta_state, save_meta_state
from distributed_mtml.meta.plan import MetaPlan
from distributed_mtml.meta.tasks import FAMILIES, Episodes, SuiteEpisodes, draw
from distributed_mtml.runtime import local
from distributed_mtml.runtime.monitor import Monitor
from distributed_mtml.runtime.worker import make_optimizer

VAL_STREAM = 2**31 - 1  # the validation episodes' stream, apart from every iteration's


def _sources(plan: MetaPlan, rank: int, world: int):
    """(training source, validation source) of this rank."""
    meta = plan.config.meta
    if plan.source == "family":
        family = FAMILIES[plan.name](meta.shots, meta.query_size())
        return family, family
    specs = {t.name: t for t in load_suite_spec(plan.suite_dir).tasks}
    train, val = {}, {}
    for name in plan.shards(world)[rank]:
        rows = plan.task_rows(load_task(plan.suite_dir, specs[name]))
        if name in plan.held_tasks:  # a task held out of meta-training: any of its train and val rows
            val[name] = tuple(torch.cat(part) for part in zip(rows["train"], rows["val"]))
            continue
        train[name] = rows["train"]
        if not plan.held_tasks:  # the val split when it holds a whole episode, else the train rows (small suites)
            val[name] = rows["val"] if len(rows["val"][1]) >= meta.shots + meta.query_size() else rows["train"]
    episodes = lambda rows: SuiteEpisodes(rows, meta.shots, meta.query_size(), plan.by_support())  # noqa: E731
    return episodes(train), episodes(val)


VALIDATED_STEPS = 10  # the inner steps the validation curve runs to: a new task's default adaptation is its best


def _validation(learner, episodes, steps: int, count: int, world: int) -> dict[str, float]:
    """Query loss of the validation episodes before adapting and after `steps` inner steps (what
    the monitor keeps a model by), and the step count 0..VALIDATED_STEPS with the least mean
    query loss, `val/meta/best_steps`: saved with the model, the adaptation `mtml predict
    --adapt-from` takes unless told (0 where adapting did not pay on the validation tasks)."""
    length = max(steps, VALIDATED_STEPS)
    curve = adaptation_curve(learner, episodes, length)["loss"] if episodes is not None else torch.zeros(0, length + 1)
    sums = summed(curve.sum(0).double(), world) / count
    best = int(sums.argmin())
    return {"val/meta/loss": float(sums[steps]), "val/meta/loss_before": float(sums[0]),
            "val/meta/best_steps": best, "val/meta/loss_best_steps": float(sums[best])}


@dataclass
class MetaWorker:
    """One rank's part of meta-training: its episode sources, the learner, the outer optimiser,
    and the state that must survive a restart (iterations done, monitor)."""

    plan: MetaPlan
    payload: dict
    rank: int
    world: int
    device: torch.device
    train_source: object  # SinusoidFamily or SuiteEpisodes: `episode(task, generator)`
    val: Episodes | None  # this rank's share of the fixed validation episodes
    learner: torch.nn.Module
    optimizer: torch.optim.Optimizer
    monitor: Monitor
    done: int  # iterations finished before this (re)start
    fault: FaultInjector
    guard: FiniteLossGuard

    @classmethod
    def start(cls, payload: dict) -> "MetaWorker":
        """Builds the learner and optimiser, restores them when Ray Train restarts the run, and
        draws this rank's validation episodes."""
        plan = MetaPlan.model_validate(payload)
        compat.quiet_ray_train_report_log()
        cfg, meta, seed = plan.config, plan.config.meta, plan.config.training.seed
        rank, world = local.rank_and_world()
        if not cfg.scaling.local:  # local mode: the command's process keeps its threads
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        device = local.device()
        train_source, val_source = _sources(plan, rank, world)
        learner = build_learner(payload).to(device)
        optimizer = make_optimizer(meta.outer_optimizer, list(learner.parameters()), meta.outer_lr, weight_decay=0.0)
        done, monitor = 0, Monitor.of(cfg)
        checkpoint = local.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                done, saved = restore_meta_state(d, learner, optimizer)
                monitor = Monitor.of(cfg, saved)
        val = draw(val_source, seed, VAL_STREAM, plan.episodes_of(rank, world, meta.val_tasks, validation=True))
        return cls(plan, payload, rank, world, device, train_source, val.to(device) if val is not None else None,
                   learner, optimizer, monitor, done, FaultInjector(rank, checkpoint is not None, world < plan.config.scaling.max_workers),
                   FiniteLossGuard([META_TASK], [META_TASK], device))

    def step(self, iteration: int) -> tuple[torch.Tensor, int]:
        """One outer update on this rank's share of the meta-batch: the sum of its query losses,
        and how many episodes it computed."""
        meta = self.plan.config.meta
        self.fault.strike(0, iteration)  # meta-training has no epochs: MTML_FAULT=<kind>@0:<iteration>
        items = self.plan.episodes_of(self.rank, self.world, meta.meta_batch_size, iteration * meta.meta_batch_size)
        episodes = draw(self.train_source, self.plan.config.training.seed, iteration, items)
        if episodes is None:  # none of this iteration's tasks is this rank's: it adds nothing to the sum
            losses = torch.zeros(0, device=self.device)
            for p in self.learner.parameters():
                p.grad = torch.zeros_like(p)
        else:
            losses = meta_gradient(self.learner, episodes.to(self.device), meta.inner_steps, meta.meta_batch_size)
        sum_grads(list(self.learner.parameters()), self.world)  # ranks divided by the meta-batch size
        self.guard.observe(losses.sum().reshape(1), iteration)
        self.optimizer.step()
        return losses.sum().double().cpu(), len(items)

    def report(self, finished: int, loss_sum: torch.Tensor, block: int, drawn: int, seconds: float) -> None:
        """The block's training loss and the validation loss after adaptation, all-reduced; the
        keep/stop decision; the report to Ray Train with a checkpoint."""
        meta = self.plan.config.meta
        self.guard.raise_if_diverged(self.world, lambda step: f"meta-iteration {step + 1}")
        metrics = {"train/meta/loss": float(summed(loss_sum, self.world)) / (block * meta.meta_batch_size)}
        metrics.update(_validation(self.learner, self.val, meta.inner_steps, meta.val_tasks, self.world))
        self.monitor.update(metrics, finished)
        metrics.update(self.monitor.report_fields(metrics))
        metrics.update({"iteration": finished, "samples": drawn, "train_seconds": seconds,
                        "holds": self.plan.holds(self.rank, self.world)})
        _report(metrics, finished, self.rank, self.payload, self.learner, self.optimizer, self.monitor.state(),
                int(metrics["val/meta/best_steps"]))


def meta_train_loop_per_worker(payload: dict) -> None:
    """What Ray Train runs on every rank: outer updates, a report every `meta.report_every`. The
    updates take their memory from the heap, as training epochs do (see `compat`)."""
    worker = MetaWorker.start(payload)
    with compat.heap_for_training():
        _meta_train(worker)


def _meta_train(worker: MetaWorker) -> None:
    meta = worker.plan.config.meta
    progress = Progress(worker.done, meta.iterations)
    loss_sum, block, drawn, begin = torch.zeros((), dtype=torch.float64), 0, 0, time.perf_counter()
    for iteration in range(worker.done, meta.iterations):
        losses, count = worker.step(iteration)
        loss_sum, drawn = loss_sum + losses, drawn + count
        block, finished = block + 1, iteration + 1
        if worker.rank == 0:
            progress.tick(finished, float(loss_sum) / max(drawn, 1))
        if finished % meta.report_every and finished != meta.iterations:
            continue
        worker.report(finished, loss_sum, block, drawn, time.perf_counter() - begin)
        if worker.monitor.stop:
            break
        loss_sum, block, drawn, begin = torch.zeros((), dtype=torch.float64), 0, 0, time.perf_counter()


class Progress:
    """A progress line every `every_s` seconds, whatever `meta.report_every` is (MLflow reports
    and checkpoints can be minutes apart): iterations/s, this block's train loss, time left."""

    def __init__(self, done: int, total: int, every_s: float = 10.0):
        self.total, self.every_s = total, every_s
        self.mark, self.mark_done, self.last = time.perf_counter(), done, time.perf_counter()

    def tick(self, finished: int, train_loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or finished == self.total:
            return
        rate = (finished - self.mark_done) / max(now - self.mark, 1e-9)
        say(progress_line("iteration", finished, self.total, [f"train/meta/loss {train_loss:.4f}", f"{rate:.1f} it/s",
                                                               f"~{(self.total - finished) / max(rate, 1e-9):.0f} s left"]))
        self.last = now


def _report(metrics: dict, finished: int, rank: int, payload: dict, learner, optimizer, monitor: dict,
            adapt_steps: int) -> None:
    """Every rank reports (a barrier); rank 0 alone writes the checkpoint, the same on all."""
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_meta_state(d, finished, payload, learner, optimizer, monitor, adapt_steps)
        local.report(metrics, d if rank == 0 else None, f"checkpoint_iteration={finished:07d}")
