"""`mtml evaluate`: per-task metrics of a trained model on a suite, a split read in batches."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.stream import tasks_split_batches
from distributed_mtml.data.tasks import load_suite_spec
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.errors import InputError
from distributed_mtml.metrics import EXACT_ROWS, StreamedMetrics
from distributed_mtml.models import MultiTaskModel, TaskShape

FORWARD_ROWS = 2048  # rows per forward pass when evaluating: a 1024-wide layer's activations are 8 MB


def forward_in_chunks(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` a chunk of rows at a time (no gradients): memory of one chunk's activations."""
    with torch.no_grad():
        return torch.cat([forward(chunk) for chunk in x.split(FORWARD_ROWS)]) if len(x) else forward(x)


def head_inputs(trunk: torch.nn.Module, modules: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """What each task's head reads for its `inputs` (no gradients): the trunk's output, through
    the task's part of the architecture (`models.TaskModule.features`). The tasks whose adapter
    is the identity (tasks of one width) go through the trunk together, in chunks, not one call
    a task."""
    plain = [n for n in inputs if isinstance(modules[n].adapter, torch.nn.Identity)]
    out = {}
    if plain:
        joined = forward_in_chunks(trunk, torch.cat([inputs[n] for n in plain]))
        out.update(zip(plain, joined.split([len(inputs[n]) for n in plain])))
    for n in inputs:
        if n not in out:
            out[n] = forward_in_chunks(lambda rows, a=modules[n].adapter: trunk(a(rows)), inputs[n])
    if all(modules[n].mix is None for n in out):
        return out
    with torch.no_grad():
        return {n: modules[n].features(modules[n].adapter(inputs[n]), f) for n, f in out.items()}


def split_metrics(shape: TaskShape, prep: TaskPrep | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None,
                  exact_rows: int = EXACT_ROWS) -> dict[str, float]:
    """A task's metrics over a split: the one scoring path of training, `mtml evaluate`, the
    trivial baseline and transfer. The split comes in batches, a streamed file's or one batch
    held in memory; exact up to `exact_rows` rows (a split in memory: pass its length), beyond
    that see `StreamedMetrics`."""
    metrics = StreamedMetrics(shape, prep, exact_rows)
    for x, y in batches:
        metrics.add(forward_in_chunks(forward, x.to(device) if device is not None else x), y)
    return metrics.result()


def tasks_metrics(shapes: dict[str, TaskShape], preps: dict[str, TaskPrep | None],
                  batches: Iterable[tuple[str, tuple[torch.Tensor, torch.Tensor]]],
                  forward: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, dict[str, float]]:
    """`split_metrics` of every task in `shapes` from one stream of (task, batch) in any order
    (`stream.tasks_split_batches`: a grouped entry's tasks come interleaved from one pass)."""
    metrics = {name: StreamedMetrics(shape, preps.get(name)) for name, shape in shapes.items()}
    for name, (x, y) in batches:
        metrics[name].add(forward_in_chunks(lambda rows, n=name: forward(n, rows), x), y)
    return {name: m.result() for name, m in metrics.items()}


def evaluate(model: MultiTaskModel, suite_dir: str, split: str = "test", checked: bool = False) -> dict[str, float]:
    """Metrics `<split>/<task>/<metric>` for every suite task the model has a head for.
    `checked`: the caller validated the suite already (the end of a run): no second pass."""
    fills = any(p.feature_fill is not None for p in model.preprocessing.values())  # trained with data.impute: mean
    spec = load_suite_spec(suite_dir) if checked else checked_suite(suite_dir, fills)
    known = [t for t in spec.tasks if t.name in model.tasks]
    if not known:
        raise InputError(f"{suite_dir}: none of its tasks {[t.name for t in spec.tasks]} has a head in the model")
    preps = {t.name: model.preprocessing.get(t.name) or TaskPrep() for t in known}  # training's statistics, not this suite's
    batches = tasks_split_batches(suite_dir, known, split, preps)
    found = tasks_metrics({t.name: model.tasks[t.name] for t in known}, preps, batches, model)
    return {f"{split}/{name}/{k}": v for name, metrics in found.items() for k, v in metrics.items()}
