"""`mtml evaluate`: per-task metrics of a trained model on a suite, a split read in batches."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.stream import split_batches
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


def evaluate(model: MultiTaskModel, suite_dir: str, split: str = "test", checked: bool = False) -> dict[str, float]:
    """Metrics `<split>/<task>/<metric>` for every suite task the model has a head for.
    `checked`: the caller validated the suite already (the end of a run): no second pass."""
    fills = any(p.feature_fill is not None for p in model.preprocessing.values())  # trained with data.impute: mean
    spec = load_suite_spec(suite_dir) if checked else checked_suite(suite_dir, fills)
    known = [t for t in spec.tasks if t.name in model.tasks]
    if not known:
        raise InputError(f"{suite_dir}: none of its tasks {[t.name for t in spec.tasks]} has a head in the model")
    out: dict[str, float] = {}
    for task in known:
        prep = model.preprocessing.get(task.name) or TaskPrep()  # training's statistics, not this suite's
        batches = split_batches(suite_dir, task, split, prep)
        metrics = split_metrics(model.tasks[task.name], prep, batches, lambda x, name=task.name: model(name, x))
        out.update({f"{split}/{task.name}/{k}": v for k, v in metrics.items()})
    return out
