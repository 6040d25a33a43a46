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

from distributed_mtml.aggregation import METHODS


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def combine(grads: torch.Tensor, method: str, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process reference: [K, P] task gradients -> (aggregated [P], weights [K])."""
    gram = (grads.double() @ grads.double().T).cpu()
    w = METHODS[method].weights(gram, seed=seed, **options)
    return (w.to(grads.dtype).to(grads.device) @ grads), w


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
