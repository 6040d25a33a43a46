"""The per-worker training loop that Ray Train runs on every rank.

Each rank owns some tasks (data, adapters, heads); the trunk is wrapped in DDP so its
gradients are averaged across ranks. All ranks take the same number of steps per epoch,
whatever their tasks' sizes, because every DDP backward and every `ray.train.report` is a
collective: a rank that stopped early would hang the others.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distributed_mtml import compat, gates, relations
from distributed_mtml.aggregation import loss_weighting, overlap, shared_layer
from distributed_mtml.aggregation.exchange import aggregated_step
from distributed_mtml.aggregation.representation import representation_step
from distributed_mtml.data.stream import StreamedBatches, dataset_batches, dataset_name, task_features
from distributed_mtml.data.tasks import load_suite_spec, load_tasks
from distributed_mtml.evaluate import head_inputs, split_metrics
from distributed_mtml.faults import FaultInjector, FiniteLossGuard
from distributed_mtml.heads import HEADS, group_key, sync_shared_grads
from distributed_mtml.heads.offset_bank import BankRow, bind_offsets
from distributed_mtml.heads.shared_plus_offset import SharedLast, stacked_outputs
from distributed_mtml.metrics import regression_metrics_by_task
from distributed_mtml.models import TaskShape, build_shared_heads, build_task_modules, build_trunk
from distributed_mtml.runtime import local
from distributed_mtml.runtime.checkpoint import plan_text
from distributed_mtml.runtime.monitor import Monitor
from distributed_mtml.runtime.worker import ReportCadence, everyones, make_optimizer
from distributed_mtml.segments import in_suite_order
from distributed_mtml.train.checkpoint import (
    optimised_parameters,
    parameter_groups,
    restore_worker_state,
    save_worker_state,
)
from distributed_mtml.train.plan import TrainPlan
from distributed_mtml.train.step import TaskBatches, epochs, join_rows, multitask_step


def _wrap_trunk(trunk: nn.Module, plan: TrainPlan, device: torch.device) -> nn.Module:
    """DDP over the trunk only, with the configured bucket size and gradient compression."""
    s = plan.config.scaling
    ids = [device] if device.type == "cuda" else None
    ddp = DistributedDataParallel(trunk, device_ids=ids, bucket_cap_mb=s.bucket_cap_mb)
    hooks = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
    if s.grad_compression in hooks:
        ddp.register_comm_hook(dist.group.WORLD, hooks[s.grad_compression])
    return ddp


def _make_step(
    plan: TrainPlan,
    placement: list[list[str]],
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict[str, TaskShape],
    optimizer: torch.optim.Optimizer,
    weighting: nn.Module,
    device: torch.device,
    world: int,
) -> Callable[[dict, int], tuple[torch.Tensor, torch.Tensor | None]]:
    """The step function for this run: (batch, seed) -> (the batch's task losses in its order,
    task weights or None).

    - Gradient methods with one task per rank: DDP whose hook all-gathers the buckets during
      the backward (`aggregation.overlap`), the fastest exchange.
    - Other gradient methods: each owned task's gradient, one all-gather (`aggregation.exchange`).
    - `aggregation.gradients: representation`: the Gram of gradients at the trunk's output, one
      trunk backward (`aggregation.representation`).
    - mean and the loss weightings: DDP's own average (none with local SGD, which averages
      parameters instead), made the gradient of the mean over the suite's tasks for heads and
      trunk alike, whatever the worker count (`multitask_step`).
    """
    cfg = plan.config
    agg = cfg.aggregation
    method, order = agg.resolved(), [s.name for s in plan.task_shapes()]
    options = {**agg.options(), **weighting.gram_options()}
    half = torch.bfloat16 if cfg.training.precision == "bf16" else None  # forward and losses only
    if agg.gradients == "representation":
        return lambda batch, seed: representation_step(
            trunk, modules, shapes, batch, optimizer, placement, order, method, seed, options, half)
    if method.needs_exchange:
        if method.kind == "gram" and world > 1 and all(len(tasks) == 1 for tasks in placement):
            ddp, gathered = overlap.wrap_trunk(trunk, device, cfg.scaling.bucket_cap_mb)
            rank_order = [placement.index([name]) for name in order]
            return lambda batch, seed: overlap.overlapped_step(
                ddp, gathered, modules, shapes, batch, optimizer, rank_order, method, seed, options, half)
        return lambda batch, seed: aggregated_step(
            trunk, modules, shapes, batch, optimizer, placement, order, method, seed, options, half)
    local_sgd = cfg.training.sync_every > 1
    synced = _wrap_trunk(trunk, plan, device) if world > 1 and not local_sgd else trunk
    weighted_total = weighting.total if method.kind == "loss" else None
    return lambda batch, seed: (
        multitask_step(synced, modules, shapes, batch, optimizer, 1 / len(order), weighted_total, half, world), None)


def _average_parameters(module: nn.Module, world: int) -> None:
    """Local-SGD synchronisation: replace every rank's trunk by the mean over ranks."""
    flat = parameters_to_vector(module.parameters())
    dist.all_reduce(flat)
    vector_to_parameters(flat / world, module.parameters())


def _step_losses(mine: list[str], order: list[str], world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a loss weighting reads every task's value (each step's losses, each epoch's mean
    losses): each rank fills its own tasks' places and one all-reduce of K floats sums the
    disjoint entries."""
    def gather(values: torch.Tensor) -> torch.Tensor:
        out = in_suite_order(values, mine, order, 0.0)
        if world > 1:
            dist.all_reduce(out)
        return out

    return gather


REFIT_ROWS = 10_000
"""A task's train split up to this many rows gets its head refitted after every epoch (see
`Worker._refit_heads`): one forward and an SVD of rows x (head width + 1), small next to its epoch."""

HOLD_SPLIT_MB = 64.0
"""A streamed task's validation split up to this size (its batches as read) is kept after its first
pass: each pass of a Ray dataset is a new execution in the worker, and every one left 40-60 MB
of resident memory behind (measured in a Ray actor on a 2M-row task), more than the split."""


def _held_after_one_pass(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], held: dict, key: str
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` passed through; if they add up to at most `HOLD_SPLIT_MB`, `held[key]` keeps
    them (the same batches, so later passes give bit-identical metrics)."""
    kept: list | None = []
    size = 0
    for x, y in batches:
        size += x.nbytes + y.nbytes
        if size > HOLD_SPLIT_MB * 2**20:
            kept = None  # too large to hold: streamed every epoch, and nothing kept meanwhile
        if kept is not None:
            kept.append((x, y))
        yield x, y
    if kept is not None:
        held[key] = kept


def _evaluate(trunk: nn.Module, modules: nn.ModuleDict, plan: TrainPlan, data: dict, split: str,
              device: torch.device, held: dict) -> dict:
    """The owned tasks' metrics on `split`: from memory (tasks up to `REFIT_ROWS` rows of it
    through the trunk together, regression metrics by segment reductions), or streamed from the
    file in batches (`held`: the small streamed splits already read once, see `HOLD_SPLIT_MB`)."""
    trunk.eval(), modules.eval()
    shapes, out = {s.name: s for s in plan.task_shapes()}, {}
    specs = {s.name: s for s in load_suite_spec(plan.suite_dir).tasks} if plan.streamed else {}
    small = [n for n in modules if n in data and len(data[n][split][1]) <= REFIT_ROWS]
    metrics_of: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for group in _row_groups(small, {n: len(data[n][split][1]) for n in small}):
            metrics_of.update(_small_tasks_metrics(trunk, modules, plan, {n: data[n][split] for n in group}, shapes))
        for name, module in modules.items():
            if name in metrics_of:
                out.update({f"{split}/{name}/{k}": v for k, v in metrics_of[name].items()})
                continue
            forward = lambda x, m=module: m(trunk, x)  # noqa: E731
            if name in data:
                x, y = data[name][split]
                metrics = split_metrics(shapes[name], plan.prep(name), [(x, y)], forward, exact_rows=len(y))
            else:  # the dataset `val-<task>` the driver handed to the trainer, or what it gave before
                key = dataset_name(name, split)
                if key in held:
                    batches = iter(held[key])
                else:
                    spec = specs[name]
                    shard = ray.train.get_dataset_shard(key)
                    batches = dataset_batches(shard, spec, task_features(plan.suite_dir, spec), plan.prep(name))
                    batches = _held_after_one_pass(batches, held, key)
                metrics = split_metrics(shapes[name], plan.prep(name), batches, forward, device)
            out.update({f"{split}/{name}/{k}": v for k, v in metrics.items()})
    trunk.train(), modules.train()
    return out


TOGETHER_ROWS = 1 << 16
"""Rows of small tasks' splits evaluated together (`_evaluate`): their trunk features are held at
once, so a suite of many mid-sized tasks is taken a group of tasks at a time."""


def _row_groups(names: list[str], rows: dict[str, int]) -> list[list[str]]:
    """`names` in consecutive groups of at most `TOGETHER_ROWS` rows (a larger task alone)."""
    groups, current, count = [], [], 0
    for name in names:
        if current and count + rows[name] > TOGETHER_ROWS:
            groups.append(current)
            current, count = [], 0
        current.append(name)
        count += rows[name]
    return groups + ([current] if current else [])


def _small_tasks_metrics(trunk: nn.Module, modules: nn.ModuleDict, plan: TrainPlan, split: dict,
                         shapes: dict[str, TaskShape]) -> dict[str, dict[str, float]]:
    """Metrics of tasks whose split (`split`: task -> (x, y)) is held in memory, all through the
    trunk together; the regression tasks' heads in one pass and their metrics by segment reductions."""
    features = head_inputs(trunk, modules, {n: x for n, (x, _) in split.items()})
    together = [n for n in split if shapes[n].type == "regression"]
    heads, inputs = [modules[n].head for n in together], [features[n] for n in together]
    outputs = stacked_outputs(heads, inputs) or [head(f) for head, f in zip(heads, inputs)]
    found = regression_metrics_by_task(outputs, [split[n][1] for n in together], [plan.prep(n) for n in together])
    metrics_of = dict(zip(together, found))
    for name, (_, y) in split.items():
        if name not in metrics_of:
            metrics_of[name] = split_metrics(shapes[name], plan.prep(name), [(features[name], y)], modules[name].head,
                                             exact_rows=len(y))
    return metrics_of


@dataclass
class Worker:
    """One rank's part of the run: its tasks' data, the model parts it holds, the optimiser,
    and the state that must survive a restart (epoch, monitor)."""

    plan: TrainPlan
    plan_text: str  # the plan as checkpoints hold it (`plan_text`), made once
    rank: int
    world: int
    device: torch.device
    placement: list[list[str]]  # the tasks of every rank in this group (it changes with its size)
    mine: list[str]  # the tasks this rank owns
    data: dict  # task -> split -> (x, y) on the device
    trunk: nn.Module
    shared: nn.ModuleDict  # the head parts tasks share (`heads/`): on every rank, like the trunk
    modules: nn.ModuleDict
    weighting: nn.Module
    optimizer: torch.optim.Optimizer
    monitor: Monitor
    start_epoch: int
    step_fn: Callable
    batches: dict[str, TaskBatches]
    fault: FaultInjector
    guard: FiniteLossGuard
    cadence: ReportCadence
    groups: dict[str, list[nn.Parameter | BankRow]]  # `parameter_groups`: how a checkpoint cuts the optimiser's state
    pending: list[dict] = field(default_factory=list)  # epochs not yet reported
    best: tuple[int, tempfile.TemporaryDirectory] | None = None  # an unreported best epoch's saved state
    held: dict = field(default_factory=dict)  # streamed tasks' small val splits, after their first pass
    em_state: dict = field(default_factory=dict)  # `head_penalty: em`'s variances, from one epoch to the next

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.plan.task_shapes()]

    @classmethod
    def start(cls, payload: dict) -> "Worker":
        """Loads this rank's tasks, builds its model parts and optimiser, and restores them from
        the latest checkpoint when Ray Train restarts the run."""
        plan = TrainPlan.model_validate(payload)
        compat.quiet_ray_train_report_log()
        cfg, t = plan.config, plan.config.training
        rank, world = local.rank_and_world()
        if not cfg.scaling.local:  # local mode: the command's process keeps its threads
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        device = local.device()
        shapes, placement = plan.task_shapes(), plan.placement(world)
        mine = placement[rank]
        order = [s.name for s in shapes]
        data = _load_tasks(plan, [n for n in mine if n not in plan.streamed], device)
        torch.manual_seed(t.seed)
        trunk = build_trunk(cfg.model, shapes).to(device)
        shared = build_shared_heads(cfg.model, shapes, t.seed).to(device)  # every rank holds all of them
        modules = build_task_modules(cfg.model, shapes, t.seed, only=mine, shared=shared, rows=plan.train_rows).to(device)
        bind_offsets(modules)  # the owned tasks' offsets as one stacked parameter per shared head
        types = {s.name: s.type for s in shapes}
        method = cfg.aggregation.resolved()
        weighting = loss_weighting(method, mine, order, cfg.aggregation.options(), types, _step_losses(mine, order, world),
                                   t.seed, shared_layer.watch(trunk) if method.shared_layer else None).to(device)
        groups = parameter_groups(trunk, modules, weighting, shared)  # the checkpoint cuts the optimiser's state by them
        optimizer = make_optimizer(t.optimizer, optimised_parameters(groups), t.lr, t.weight_decay)
        optimizer.register_step_pre_hook(lambda *_: sync_shared_grads(shared, world))
        start_epoch, monitor, refit = 0, Monitor.of(cfg), {}
        checkpoint = local.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                start_epoch, saved, refit = restore_worker_state(d, trunk, modules, optimizer, weighting, shared)
                monitor = Monitor.of(cfg, saved)
        if t.sync_every > 1 and world > 1:
            _average_parameters(trunk, world)  # what DDP's constructor would do: start in agreement
        step_fn = _make_step(plan, placement, trunk, modules, {s.name: s for s in shapes}, optimizer, weighting, device, world)
        batches = {n: _task_batches(plan, n, data, order.index(n), device) for n in mine}
        join_rows([b for b in batches.values() if isinstance(b, TaskBatches)])
        for n, b in batches.items():  # a joined task's train split is its view of the joined rows
            if isinstance(b, TaskBatches):
                data[n]["train"] = (b.x, b.y)
        return cls(plan, plan_text(payload), rank, world, device, placement, mine, data, trunk, shared, modules, weighting, optimizer, monitor,
                   start_epoch, step_fn, batches, FaultInjector(rank, checkpoint is not None, world < plan.config.scaling.max_workers),
                   FiniteLossGuard(order, mine, device), ReportCadence(t.report_every_s, world, device), groups, em_state=refit)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """`steps_per_epoch` steps over this rank's tasks; their training metrics."""
        plan, cfg, t = self.plan, self.plan.config, self.plan.config.training
        order, steps = self.order, plan.steps_per_epoch
        shapes = {s.name: s for s in plan.task_shapes()}
        local_sgd = t.sync_every > 1 and self.world > 1
        torch.manual_seed(t.seed * 100_003 + epoch * 101 + self.rank)  # dropout, reproducible on resume
        sums = torch.zeros(len(self.mine), device=self.device)  # each owned task's summed loss
        weight_sums = torch.zeros(len(order), dtype=torch.float64)
        relation_sums: dict[str, float] = {}
        samples, measured, begin = 0, 0, time.perf_counter()
        for step, group in enumerate(epochs([self.batches[n] for n in self.mine], epoch, steps)):
            batch = self.fault.strike(epoch, step, dict(zip(self.mine, group)))
            if cfg.relations.enabled and step % cfg.relations.every_n_steps == 0:
                found = relations.measure(self.trunk, self.modules, shapes, batch, self.placement, order,
                                          cfg.relations.lr or t.lr)
                relation_sums = {k: relation_sums.get(k, 0.0) + v for k, v in found.items()}
                measured += 1
            seed = t.seed * 1_000_003 + epoch * steps + step  # same PCGrad order on every rank
            losses, w = self.step_fn(batch, seed)
            if w is not None:
                weight_sums += w
            if local_sgd and ((step + 1) % t.sync_every == 0 or step + 1 == steps):
                _average_parameters(self.trunk, self.world)
            values = losses.detach()  # the owned tasks', in the batch's order (`mine`)
            sums += values
            self.guard.observe(values, step)
            samples += sum(len(y) for _, y in group)
        train_seconds = time.perf_counter() - begin
        self.guard.raise_if_diverged(self.world, lambda step: f"epoch {epoch}, step {step}")
        metrics = {f"train/{n}/loss": total / steps for n, total in zip(self.mine, sums.tolist())}
        metrics.update(self._weights(sums, weight_sums))
        metrics.update({k: v / measured for k, v in relation_sums.items()})
        return {**metrics, "epoch": epoch, "samples": samples, "train_seconds": train_seconds, "holds": self.mine}

    def _weights(self, sums: torch.Tensor, weight_sums: torch.Tensor) -> dict[str, float]:
        """Each owned task's mean aggregation weight this epoch (none for `mean`); a loss
        weighting also ends its epoch here."""
        method, order, steps = self.plan.config.aggregation.resolved(), self.order, self.plan.steps_per_epoch
        if method.needs_exchange:
            return {f"aggregation/{n}/weight": float(weight_sums[order.index(n)]) / steps for n in self.mine}
        if method.kind != "loss":
            return {}
        weights = {f"aggregation/{n}/weight": w for n, w in self.weighting.weights().items()}
        self.weighting.end_epoch(self.weighting.gather(sums.double() / steps).cpu())  # every task's epoch mean
        return weights

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Validation metrics of every rank and the keep/stop decision, every epoch; the report
        to Ray Train (a barrier, about 1 s) only when one is due (`ReportCadence`). The epochs
        between reports travel in the next one, each with its own metrics; an epoch that
        improved the monitored value is saved at once (`best`) and reported as a checkpoint of
        its own epoch, so the kept model is still the best epoch's."""
        cfg = self.plan.config
        metrics = {**metrics, **self._refit_heads()}
        held = {n: self.data[n]["val"][0] for n in self.mine if n in self.data}
        val = everyones({**_evaluate(self.trunk, self.modules, self.plan, self.data, "val", self.device, self.held),
                         **gates.epoch_metrics(self.trunk, self.modules, held, self.order)}, self.world)
        improved = self.monitor.update(val, epoch)
        self.pending.append({**metrics, **val, **self.monitor.report_fields(val)})
        if improved:
            self.best = (epoch, self._save(epoch))
        every, last = cfg.checkpoint.every_n_epochs, epoch + 1 == cfg.training.epochs or self.monitor.stop
        checkpoint_due = every is not None and (epoch + 1) % every == 0
        if last or checkpoint_due or self.cadence.due():
            self._flush(epoch, checkpoint=last or checkpoint_due or every is None)

    def _refit_heads(self) -> dict[str, float]:
        """The head kind's closed-form solve after the epoch's steps (`heads.HeadKind.refit`), on
        each owned regression task's train split held in memory, up to `REFIT_ROWS` rows (a larger
        task takes enough steps an epoch to fit its head). Every rank calls the kind's refit.
        Returns the metric `heads/penalty`: the penalty it used (`auto`: the one it learned), none
        where no task had anything to solve."""
        model = self.plan.config.model
        refit = HEADS[model.heads].refit
        if refit is None:
            return {}
        shapes = {s.name: s for s in self.plan.task_shapes()}
        regression = [n for n in self.mine if shapes[n].type == "regression"]
        solved = [n for n in regression if n in self.data and len(self.data[n]["train"][1]) <= REFIT_ROWS]
        left_out = len(solved) < len(regression)
        self.trunk.eval()
        features = head_inputs(self.trunk, self.modules, {n: self.data[n]["train"][0] for n in solved})
        problems = {n: (self.modules[n].head, features[n], self.data[n]["train"][1]) for n in solved}
        self.trunk.train()
        key = group_key("regression", 1)
        last = None
        if key in self.shared:  # the shared regression head's last layer; with passthrough its inputs end in the model's
            linear = self.shared[key][1]
            passed = 0 if model.head_hidden or not model.trunk.passthrough else linear.in_features - model.trunk.widths[-1]
            last = SharedLast(linear, passed, self.em_state)
        lam = refit(problems, model.head_penalty, self.world, self.device, last, not left_out)
        return {} if lam is None else {"heads/penalty": float(lam)}

    def _save(self, epoch: int) -> tempfile.TemporaryDirectory:
        d = tempfile.TemporaryDirectory()
        save_worker_state(d.name, self.rank, epoch, self.plan_text, self.trunk, self.modules, self.optimizer,
                          self.weighting, self.monitor.state(), self.shared, self.em_state, self.groups)
        return d

    def _flush(self, epoch: int, checkpoint: bool) -> None:
        """Reports the pending epochs: first up to a best epoch before this one, with its saved
        state; then the rest, with this epoch's state when `checkpoint` (or when it is the best)."""
        if self.best is not None and self.best[0] < epoch:
            head = [m for m in self.pending if m["epoch"] <= self.best[0]]
            _report(head, self.best[1])
            self.pending, self.best = self.pending[len(head):], None
        saved = self.best[1] if self.best is not None else self._save(epoch) if checkpoint else None
        _report(self.pending, saved)
        self.pending, self.best = [], None
        self.cadence.reported()


def _report(epochs: list[dict], saved: tempfile.TemporaryDirectory | None) -> None:
    """One report to Ray Train: the last epoch's metrics (what a checkpoint is scored by) and
    every epoch's under "epochs" (the controller logs each at its own step)."""
    metrics = {**epochs[-1], "epochs": epochs}
    if saved is None:
        local.report(metrics)
        return
    with saved:
        local.report(metrics, saved.name, f"checkpoint_epoch={int(epochs[-1]['epoch']):04d}")


def _load_tasks(plan: TrainPlan, mine: list[str], device: torch.device) -> dict:
    """This rank's tasks, preprocessed as the plan says, per split as tensors on the device."""
    specs = {s.name: s for s in load_suite_spec(plan.suite_dir).tasks}
    loaded = load_tasks(plan.suite_dir, [specs[n] for n in mine], {n: plan.prep(n).classes for n in mine})
    data = {}
    for name in mine:
        d = plan.prep(name).apply(loaded.pop(name))
        data[name] = {s: (torch.from_numpy(d.x[s]).to(device), torch.from_numpy(d.y[s]).to(device)) for s in d.x}
    return data


def _task_batches(plan: TrainPlan, name: str, data: dict, task_index: int, device: torch.device):
    """The task's train batches: from memory, or streamed from the Ray dataset `<task>/train`
    that the driver handed to the trainer (this rank, the owner, is the only one reading it)."""
    t = plan.config.training
    if name not in plan.streamed:
        return TaskBatches(*data[name]["train"], t.batch_size, t.seed, task_index)
    spec = next(s for s in load_suite_spec(plan.suite_dir).tasks if s.name == name)
    features = task_features(plan.suite_dir, spec)
    return StreamedBatches(ray.train.get_dataset_shard(dataset_name(name)), spec, features, plan.prep(name),
                           t.batch_size, t.seed, task_index, plan.train_rows[name], plan.config.data.shuffle_buffer_rows,
                           device)


def train_loop_per_worker(payload: dict) -> None:
    """What Ray Train runs on every rank: set up, then train and evaluate each epoch, reporting
    when a report is due. Training steps take their memory from the heap, and the rest (loading,
    evaluation) holds glibc's mmap threshold (see `compat`): a 4 x 1024 trunk's first
    validation pass over a 300,000-row split grew a worker by 140 MB (peak 250) without it."""
    compat.hold_mmap_threshold()
    worker = Worker.start(payload)
    for epoch in range(worker.start_epoch, worker.plan.config.training.epochs):
        with compat.heap_for_training():
            metrics = worker.train_epoch(epoch)
        worker.end_epoch(epoch, metrics)
        if worker.monitor.stop:
            break
