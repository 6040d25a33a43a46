"""Each task's gradient norm at the last shared layer: what GradNorm and DB-MTL balance.

Both papers measure a task's pull on the shared network at its last shared weight matrix W
(cheaper than the whole trunk, and for a plain trunk the layer every head reads). Here W is the
trunk's last parameter of two or more dimensions in module order: an MLP trunk's last Linear, an
expert trunk's last expert's. The norms of all tasks come with their losses from the
weighting's gather (one all-reduce of 2K floats across workers, `suite_losses_and_norms`).

How a rank takes its own tasks' norms:
- W an `nn.Linear`'s weight (`watch` finds it and keeps what its last forward saw): one backward
  of the summed losses to the layer's output z gives every row its own task's dL/dz (no layer of
  ours mixes rows), and task t's gradient is sum over its rows of dL/dz_r x input_r (the
  per-example-gradient identity, per task), one small matrix product a task.
- Otherwise one autograd.grad of each task's loss to W (the graph above W only, not the trunk's):
  at 128 tasks a worker, GradNorm's steps ran at 0.07x of `mean`'s that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distributed_mtml.aggregation.loss_weighting import as_vector


@dataclass
class LastLayer:
    """W, and where it is an `nn.Linear`'s weight, that layer and (input, output) of its last
    forward, which a hook keeps."""

    weight: nn.Parameter
    module: nn.Linear | None = None
    seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """A training forward's (not evaluation's: no gradient, and its rows are many)."""
        self.seen = (args[0], output) if torch.is_grad_enabled() else None


def last_weight(trunk: nn.Module) -> nn.Parameter | None:
    """W: the trunk's last trainable parameter of two or more dimensions; None if it has none."""
    matrices = [p for p in trunk.parameters() if p.requires_grad and p.dim() >= 2]
    return matrices[-1] if matrices else None


def watch(trunk: nn.Module) -> LastLayer | None:
    """The trunk's W, with a forward hook on its Linear layer where it has one; None without a W."""
    weight = last_weight(trunk)
    if weight is None:
        return None
    module = next((m for m in trunk.modules() if isinstance(m, nn.Linear) and m.weight is weight), None)
    layer = LastLayer(weight, module)
    if module is not None:
        module.register_forward_hook(layer.keep)
    return layer


def norms(losses: torch.Tensor | list[torch.Tensor], at: nn.Parameter | LastLayer,
          rows: list[int] | None = None) -> torch.Tensor:
    """|d L_i / d W| of each owned task's loss, [n] float64 (0 where a loss does not reach W).
    `rows`: each task's rows in the step's batch, in order, which the one-backward form needs."""
    layer = at if isinstance(at, LastLayer) else LastLayer(at)
    seen = layer.seen
    if seen is not None and rows is not None and sum(rows) == len(seen[0]) and seen[1].requires_grad:
        return _from_rows(as_vector(losses), seen, rows)
    out = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, layer.weight, retain_graph=True, allow_unused=True)
        out.append(grad.detach().double().norm() if grad is not None else torch.zeros((), dtype=torch.float64))
    return torch.stack(out)


def suite_losses_and_norms(losses: torch.Tensor | list[torch.Tensor], at: nn.Parameter | LastLayer,
                           rows: list[int] | None, gather: Callable[[torch.Tensor], torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's loss and its gradient norm at W, [K] float64 each in suite order, from one
    gather of both (one all-reduce of 2K floats a step, not two of K)."""
    both = gather(torch.stack([as_vector(losses).detach().double(), norms(losses, at, rows)], 1))
    return both[:, 0], both[:, 1]


def _from_rows(losses: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor], rows: list[int]) -> torch.Tensor:
    """The norms from one backward to the layer's output (see the module's docstring)."""
    inputs, output = seen
    (delta,) = torch.autograd.grad(losses.sum(), output, retain_graph=True)
    pairs = zip(delta.detach().double().split(rows), inputs.detach().double().split(rows))
    return torch.stack([(d.T @ a).norm() for d, a in pairs])
