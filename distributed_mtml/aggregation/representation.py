"""`aggregation.gradients: representation`: Gram-based weights at the cost of one trunk backward.

MGDA-UB (Sener & Koltun 2018) solves the method on the task gradients with respect to the
trunk's output Z instead of the trunk's parameters: ||sum_t w_t dL_t/dtheta|| is bounded by
||dZ/dtheta|| ||sum_t w_t dL_t/dZ||, and the first factor does not depend on w. There every
sample carries every task's label, so all tasks share one Z. Here each task has its own rows,
so the tasks' dL_t/dZ live on disjoint rows and their Gram would be diagonal (no conflict ever
seen). Each task's representation gradient is therefore taken over its rows summed: the
gradient with respect to one shift of Z shared by every row, r_t = sum_rows dL_t/dZ_row, a
D-vector. Two tasks that want Z moved in opposite directions conflict there as they do in the
parameters; the Gram of the r_t gives the weights w (same methods, same seed, across workers
as for parameter gradients, exchanging K x D floats instead of K x P).

Then one backward through the trunk of sum_t w_t L_t gives the trunk its update sum_t w_t g_t
(g_t each task's own parameter gradient), summed over ranks by one all-reduce; the heads and
adapters get their own task's gradient, as with parameter gradients. The cost per step is one
trunk forward and backward whatever the number of tasks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distributed_mtml.aggregation import Method
from distributed_mtml.aggregation.exchange import gather_task_grads
from distributed_mtml.collective import sum_grads
from distributed_mtml.models import learned_width, task_losses


def task_representations(trunk: nn.Module, modules: nn.ModuleDict, shapes: dict,
                         batches: dict[str, tuple[torch.Tensor, torch.Tensor]], autocast: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One forward of every owned task (`models.task_losses`, cut at the trunk's output): (the
    trunk's output Z for all owned rows, still attached to the trunk's graph; each task's loss;
    dL/dZ per row, each row's from its own task's loss). The heads' gradients are accumulated
    on the way, each from its own task's loss."""
    cut: dict[str, torch.Tensor] = {}

    def detach_output(_module, _args, z):  # the heads see a leaf copy: their backward stops there
        cut["z"], cut["leaf"] = z, z.detach().requires_grad_()
        return cut["leaf"]

    handle = trunk.register_forward_hook(detach_output)
    try:
        losses = task_losses(trunk, modules, shapes, batches, autocast)
    finally:
        handle.remove()
    losses.sum().backward()  # the heads' gradients, and every row's dL_t/dZ into the leaf
    return cut["z"], losses, cut["leaf"].grad


def representation_step(
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
    """One step with weights from the representation Gram; returns task losses and weights [K]."""
    names = list(batches)
    optimizer.zero_grad(set_to_none=True)
    z, losses, z_grad = task_representations(trunk, modules, shapes, batches, autocast)
    sizes = [len(y) for _, y in batches.values()]
    learned = learned_width(trunk, z.shape[-1])  # a passthrough trunk's input is no trunk parameter's to move
    local = torch.stack([g.float().sum(0) for g in z_grad[:, :learned].split(sizes)])
    rows = gather_task_grads(local, placement, order) if len(placement) > 1 else local
    w = method.weights((rows @ rows.T).double().cpu(), seed=seed, **options)
    adapters = [p for n in names for p in modules[n].adapter.parameters() if p.requires_grad]
    if adapters:  # their own task's plain gradient, as with parameter gradients: a backward of its own
        _accumulate(adapters, torch.autograd.grad(z, adapters, z_grad, retain_graph=True))
    per_row = torch.tensor([float(w[order.index(n)]) for n in names], dtype=z_grad.dtype).repeat_interleave(
        torch.tensor(sizes)).to(z_grad.device)
    params = [p for p in trunk.parameters() if p.requires_grad]
    _accumulate(params, torch.autograd.grad(z, params, z_grad * per_row[:, None], allow_unused=True))
    if len(placement) > 1:
        sum_grads(params, dist.get_world_size())  # the trunk's sum_t w_t g_t: each rank holds its tasks' part
    optimizer.step()
    return losses.detach(), w


def _accumulate(params: list[nn.Parameter], grads: tuple) -> None:
    for p, g in zip(params, grads):
        g = torch.zeros_like(p) if g is None else g
        p.grad = g if p.grad is None else p.grad + g
