"""Forming the task Gram matrix across workers and applying the aggregated trunk gradient.

Each worker holds the flat trunk gradient of every task it owns. One all-gather (padded to
the largest number of tasks per worker, since gloo needs equal sizes) gives every worker
all K task gradients; each then forms the same K x K Gram matrix in float64, derives the
same weights from the chosen method with the same seed, and writes sum_k w_k g_k into the
trunk's `.grad`. Bytes exchanged per step: world * max_tasks_per_worker * P floats received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distributed_mtml.aggregation import Method, combine
from distributed_mtml.models import head_parameters, task_losses


def gather_task_grads(local: torch.Tensor, placement: list[list[str]], order: list[str]) -> torch.Tensor:
    """All-gather every rank's [n_r, P] task gradients into [K, P] in suite order."""
    most = max(len(tasks) for tasks in placement)
    padded = torch.zeros(most, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in placement]
    dist.all_gather(parts, padded)
    rows = {name: parts[r][i] for r, tasks in enumerate(placement) for i, name in enumerate(tasks)}
    return torch.stack([rows[name] for name in order])


def write_grad(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


ROW_WISE = (nn.Linear, nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Dropout)  # no layer mixes rows


def task_trunk_gradients(
    trunk: nn.Module, modules: nn.ModuleDict, shapes: dict, batches: dict, keep_graph: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each owned task's loss and its flat trunk gradient [n, P], from one shared forward.

    A trunk of Linear layers between row-wise functions (what `layers.mlp` builds without layer
    norm) takes them all from one backward: see `_one_backward`. Any other trunk takes one
    backward per task."""
    params = [p for p in trunk.parameters() if p.requires_grad]
    row_wise = isinstance(trunk, nn.Sequential) and all(isinstance(m, ROW_WISE) for m in trunk)
    if len(batches) > 1 and row_wise and len(params) == len(list(trunk.parameters())):
        return _one_backward(trunk, modules, shapes, batches, keep_graph, autocast)
    losses = task_losses(trunk, modules, shapes, batches, autocast)
    rows = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=keep_graph or i + 1 < len(losses), allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return losses, torch.stack(rows)


def _one_backward(trunk: nn.Sequential, modules: nn.ModuleDict, shapes: dict, batches: dict, keep_graph: bool,
                  autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row belongs to one task and no layer mixes rows, so one backward of the summed loss
    gives each row, at every Linear's output, the gradient of its own task's loss. A task's
    weight gradient is then the sum over its rows of (output gradient x input), one matrix
    product per task, and its bias gradient the sum of its rows' output gradients: the
    per-example-gradient identity, per task. One backward instead of one per task: at 64 tasks
    on a worker, the loop's backwards were most of a step."""
    linears = [m for m in trunk if isinstance(m, nn.Linear)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, args, out: seen.append((args[0], out))) for m in linears]
    try:
        losses = task_losses(trunk, modules, shapes, batches, autocast)
    finally:
        for h in hooks:
            h.remove()
    deltas = torch.autograd.grad(losses.sum(), [out for _, out in seen], retain_graph=keep_graph)
    sizes = [len(y) for _, y in batches.values()]
    parts = []
    for layer, (inputs, _), delta in zip(linears, seen, deltas):
        pairs = list(zip(delta.float().split(sizes), inputs.detach().float().split(sizes)))
        parts.append(torch.stack([d.T @ a for d, a in pairs]).flatten(1))
        if layer.bias is not None:
            parts.append(torch.stack([d.sum(0) for d, _ in pairs]))
    return losses, torch.cat(parts, 1)


def aggregated_step(
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    placement: list[list[str]],
    order: list[str],
    method: Method,
    seed: int,
    options: dict,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step with a conflict-aware trunk update; returns task losses and the weights [K].

    Each owned task's trunk gradient is taken separately from one shared forward; the heads
    and adapters get their own task's plain gradient; the trunk gets sum_k w_k g_k.
    """
    losses, stacked = task_trunk_gradients(trunk, modules, shapes, batches, keep_graph=True, autocast=autocast)
    params = [p for p in trunk.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward(inputs=head_parameters(modules))
    all_grads = gather_task_grads(stacked, placement, order) if len(placement) > 1 else stacked
    aggregated, w = combine(all_grads, method, seed, **options)
    write_grad(params, aggregated)
    optimizer.step()
    return losses.detach(), w
