"""The shared trunk, per-task heads and per-task input adapters.

The trunk, and the head parts that tasks share (`heads/`, `model.heads`), are synchronised
across workers; a task's adapter and its own head part live on the worker that owns the task.
Adapters exist only when tasks disagree on feature width: they map each task's features into
the trunk's input width ("feature mapping").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from distributed_mtml.architectures import ARCHITECTURES
from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import TaskScan
from distributed_mtml.data.suite import TaskData
from distributed_mtml.heads import HEADS, build_shared, group_key
from distributed_mtml.heads.shared_plus_offset import stacked_output, stacked_penalties
from distributed_mtml.segments import row_tasks, segment_means

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig

META_TASK = "meta"  # the one head a meta-learned model carries: every task's starting head


@dataclass(frozen=True)
class TaskShape:
    """What the model must know of a task: its kind and its input and output widths."""

    name: str
    type: str  # "classification" | "regression"
    num_features: int
    num_classes: int | None = None

    @property
    def out_width(self) -> int:
        return self.num_classes if self.type == "classification" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, data: TaskData) -> "TaskShape":
        """A loaded task's shape (string labels count their own classes)."""
        return cls(data.spec.name, data.spec.type, len(data.features), data.num_classes)

    @classmethod
    def of_scan(cls, scan: TaskScan) -> "TaskShape":
        """The same, from a streamed pass over the task's file (no rows kept)."""
        classes = scan.class_names()
        return cls(scan.task.name, scan.task.type, len(scan.features), len(classes) if classes else scan.task.num_classes)


def trunk_input_width(cfg: ModelConfig, tasks: list[TaskShape]) -> int:
    widths = {t.num_features for t in tasks}
    if cfg.input_width is not None:
        return cfg.input_width
    return widths.pop() if len(widths) == 1 else max(widths)


def learned_width(trunk: nn.Module, output_width: int) -> int:
    """How many of the trunk's `output_width` columns its parameters make: all of a plain trunk's
    or of experts'; a passthrough trunk's less its input, which no trunk parameter moves
    (DDP-wrapped or not)."""
    inner = getattr(trunk, "module", trunk)
    return output_width - getattr(inner, "passes_input", 0)


def build_trunk(cfg: ModelConfig, tasks: list[TaskShape]) -> nn.Module:
    """The part of the network every task shares (`model.architecture`'s shared part)."""
    return ARCHITECTURES[cfg.architecture].shared(cfg, trunk_input_width(cfg, tasks), len(tasks))


def trunk_output_width(cfg: ModelConfig, trunk_in: int) -> int:
    """What a head reads: the trunk's last width, and its input with `model.trunk.passthrough`."""
    return cfg.trunk.widths[-1] + (trunk_in if cfg.trunk.passthrough else 0)


class TaskModule(nn.Module):
    """A task's private parameters: an optional input adapter, its part of the architecture
    (`architectures/`: a gate, its own experts; none under `hard`) and its head (`heads.HEADS`:
    its own, or its part of a head shared with the tasks of its type; see `heads/`)."""

    def __init__(self, task: TaskShape, cfg: ModelConfig, trunk_in: int, shared: nn.ModuleDict | None = None,
                 rows: int = 1, index: int = 0, tasks: int = 1):
        super().__init__()
        self.adapter = nn.Identity() if task.num_features == trunk_in else nn.Linear(task.num_features, trunk_in)
        part = shared[group_key(task.type, task.out_width)] if shared is not None and len(shared) else None
        self.head = HEADS[cfg.heads].task_head(task.out_width, cfg, trunk_output_width(cfg, trunk_in), part, rows)
        own = ARCHITECTURES[cfg.architecture].task_part  # made after the head: a head starts as under `hard`
        self.mix = own(cfg, trunk_in, index, tasks) if own is not None else None

    @classmethod
    def of_parts(cls, adapter: nn.Module, mix: nn.Module | None, head: nn.Module) -> "TaskModule":
        """A task module from parts already made: a new group's, from its known tasks' (`new_task`)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.adapter, module.mix, module.head = adapter, mix, head
        return module

    def features(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        """What the head reads, from the task's (adapted) inputs and the trunk's output of them."""
        return shared_output if self.mix is None else self.mix(inputs, shared_output)

    def forward(self, trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The task's output for its rows `x`, through `trunk` (the model's, or a copy of it)."""
        inputs = self.adapter(x)
        return self.head(self.features(inputs, trunk(inputs)))


def build_shared_heads(cfg: ModelConfig, tasks: list[TaskShape], seed: int) -> nn.ModuleDict:
    """The head parts the suite's tasks share (empty for `separate`), the same on every worker."""
    width = trunk_output_width(cfg, trunk_input_width(cfg, tasks))
    return build_shared(cfg, [(t.type, t.out_width) for t in tasks], width, seed)


def new_task_head(cfg: ModelConfig, task: TaskShape, shared: nn.ModuleDict, trunk_in: int) -> nn.Module:
    """A head for a task the model was not trained on: the shared head of its type and width
    where the model has one (`heads/`: offsets or embedding at zero, the tasks' common ground),
    else a fresh head of its own. A self-contained module: every parameter it uses is its own."""
    key = group_key(task.type, task.out_width)
    part = shared[key] if key in shared else None
    cfg = cfg if part is not None else cfg.model_copy(update={"heads": "separate"})
    return HEADS[cfg.heads].task_head(task.out_width, cfg, trunk_output_width(cfg, trunk_in), part, 1).standalone()


def new_task(cfg: ModelConfig, known: list[TaskModule], adapter: nn.Module, head: nn.Module) -> TaskModule:
    """A task the model was not trained on, like the `known` tasks (a new group of their table):
    `head` (the shared head of its type, `new_task_head`, or one fitted to its rows), `adapter` (a
    known task's: the group reads the same columns), and the architecture's part for a new task
    from what the known tasks' parts share (their gates averaged; none under `hard`)."""
    make = ARCHITECTURES[cfg.architecture].new_task_part
    return TaskModule.of_parts(adapter, make([k.mix for k in known]) if make is not None else None, head)


def build_task_modules(
    cfg: ModelConfig, tasks: list[TaskShape], seed: int, only: list[str] | None = None,
    shared: nn.ModuleDict | None = None, rows: dict[str, int] | None = None,
) -> nn.ModuleDict:
    """Modules of the tasks named in `only` (default: all), each seeded by its index in the
    suite, so a head's initial weights do not depend on which worker builds it. `shared`: the
    shared head parts (`build_shared_heads`) their heads use (default: new ones, reached through
    `head_parameters`); `rows`: each task's train rows, which scale a sharing head's penalty. A
    task alone in its group (type and width) has no part of its own: an offset beside a head
    that only it uses would change nothing but double the step its head takes."""
    trunk_in = trunk_input_width(cfg, tasks)
    shared = build_shared_heads(cfg, tasks, seed) if shared is None else shared  # reached through the heads
    groups = Counter(group_key(t.type, t.out_width) for t in tasks)
    alone = cfg.model_copy(update={"head_penalty": float("inf")})  # the shared head is the task's own
    modules = {}
    for i, task in enumerate(tasks):
        if only is None or task.name in only:
            torch.default_generator.manual_seed(seed * 1000 + i + 1)  # modules are made on the CPU: its generator
            # alone (`torch.manual_seed` also seeds every accelerator's: 0.7 ms a task, 3% of a 1,000-task run)
            own = alone if groups[group_key(task.type, task.out_width)] == 1 and len(shared) else cfg
            modules[task.name] = TaskModule(task, own, trunk_in, shared, (rows or {}).get(task.name, 1), i, len(tasks))
    return nn.ModuleDict(modules)


def head_parameters(modules: nn.ModuleDict) -> list[nn.Parameter]:
    """Every parameter the tasks' heads and adapters use: their own, then the parts they refer to
    (once each): the shared head parts and a worker's stacked offsets (`heads/offset_bank.py`)."""
    parts = {id(part): part for m in modules.values() for part in (getattr(m.head, "shared", None),
                                                                    getattr(m.head, "bank", None)) if part is not None}
    return [*modules.parameters(), *(p for part in parts.values() for p in part.parameters())]


def task_loss(task: TaskShape, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, squared error for regression (the article's losses)."""
    if task.type == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output.squeeze(-1), target)


def task_losses(
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict[str, TaskShape],
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Every batch's loss, [tasks] in the batches' order, with all tasks through the trunk in one
    forward call (a vector, not a list: a thousand tasks' losses are one tensor to sum or weigh).

    One trunk forward per step (not one per task) keeps DDP's one-forward-one-backward
    contract and gives the trunk larger, more efficient matrix products. `autocast` (bf16)
    covers this forward and the losses only: PyTorch's rule, the backward and the optimiser
    step run outside it.
    """
    names = list(batches)
    device = next(iter(batches.values()))[0].device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        inputs = [modules[n].adapter(batches[n][0]) for n in names]
        sizes = [len(x) for x in inputs]
        features = trunk(inputs[0] if len(inputs) == 1 else torch.cat(inputs))  # one task a worker: no copy
        if modules[names[0]].mix is not None:
            parts = features.split(sizes)
            features = torch.cat([modules[n].features(x, f) for n, x, f in zip(names, inputs, parts)])
        heads = [modules[n].head for n in names]
        output = stacked_output(heads, features, sizes) if len(heads) > 1 else None
        if output is not None:  # many tasks of one shared head: rows kept joined, losses by segment means
            targets = torch.cat([batches[n][1] for n in names])
            return _segment_losses(shapes[names[0]], output, targets, sizes) + stacked_penalties(heads).to(output.dtype)
        return torch.stack([_with_penalty(task_loss(shapes[n], modules[n].head(f), batches[n][1]), modules[n].head)
                            for n, f in zip(names, features.split(sizes))])


def _segment_losses(shape: TaskShape, output: torch.Tensor, target: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`task_loss` of tasks of one type and width at once, their rows joined (`sizes` a task):
    per-row losses, then each task's mean."""
    if shape.type == "classification":
        rows = F.cross_entropy(output, target, reduction="none")
    else:
        rows = F.mse_loss(output.squeeze(-1), target, reduction="none")
    return segment_means(rows, row_tasks(sizes, rows.device), sizes)


def _with_penalty(loss: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """A sharing head's penalty on the task's own head parameters joins its loss (`heads/`)."""
    penalty = head.penalty()
    return loss if penalty is None else loss + penalty.to(loss.dtype)


class MultiTaskModel(nn.Module):
    """Trunk plus every task's module; what `mtml evaluate` and transfer load. `preprocessing`:
    each task's train-split statistics and class names, which its inputs must go through."""

    def __init__(self, cfg: ModelConfig, tasks: list[TaskShape], seed: int = 0,
                 preprocessing: dict[str, TaskPrep] | None = None):
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.preprocessing = preprocessing or {}
        torch.manual_seed(seed)
        self.trunk = build_trunk(cfg, tasks)
        self.shared_heads = build_shared_heads(cfg, tasks, seed)
        self.task_modules = build_task_modules(cfg, tasks, seed, shared=self.shared_heads)

    def forward(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return self.task_modules[task](self.trunk, x)


class InnerRule(Protocol):
    """What a meta-learned model offers a new task: the model, the names of the parameters its
    inner loop adapts (ANIL: the head's), and each one's step size (Meta-SGD: learned).
    `meta.algorithms.MetaLearner` is one; transfer asks for this, not for an algorithm's name."""

    model: MultiTaskModel
    adapted: list[str]

    def rate(self) -> dict[str, torch.Tensor | float]: ...
