"""Conflict-aware aggregation that overlaps the gradient exchange with the backward pass.

When every worker owns exactly one task, its trunk gradient *is* that task's gradient, so
DDP's machinery can carry the exchange: a communication hook all-gathers each gradient
bucket asynchronously as soon as the backward fills it (instead of all-reducing it), and
leaves the local gradient in place. When the backward returns, every rank holds every
task's gradient bucket by bucket; the Gram matrix is the sum of the buckets' partial Grams,
and each bucket (a view of the trunk's `.grad`, `gradient_as_bucket_view=True`) is
overwritten with sum_k w_k g_k. No flat copy of the gradients is made, and the exchange
runs while the backward computes the earlier layers, as DDP's own average does.

Several tasks per worker need one gradient per task, so they use `exchange.aggregated_step`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_mtml.aggregation import Method
from distributed_mtml.models import task_losses


class GatherBuckets:
    """DDP communication-hook state: the gathered [W, n] rows of every bucket of one step."""

    def __init__(self, world: int):
        self.world = world
        self.buckets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(self, _state, bucket):  # no annotations: DDP checks them against the real types
        """Start the bucket's all-gather; DDP waits for the returned future before the step."""
        local = bucket.buffer()
        rows = torch.empty(self.world, local.numel(), dtype=local.dtype, device=local.device)
        index = bucket.index()
        work = dist.all_gather(list(rows.unbind(0)), local, async_op=True)

        def gathered(_):
            # The bucket's partial Gram, computed as soon as its rows arrive (off the
            # backward's thread), so that only a K x K sum is left after the backward.
            self.buckets[index] = (local, rows, rows @ rows.T)
            return local

        return work.get_future().then(gathered)

    def gram(self) -> torch.Tensor:
        """[W, W] Gram of the ranks' gradients, in the gradients' precision, then float64."""
        return sum(part for _, _, part in self.buckets.values()).double().cpu()

    def apply(self, weights: torch.Tensor) -> None:
        """Overwrite every bucket (the trunk's `.grad`) with the weighted sum of the ranks' rows."""
        for local, rows, _ in self.buckets.values():
            torch.mv(rows.T, weights.to(rows), out=local)
        self.buckets.clear()


def wrap_trunk(trunk: nn.Module, device: torch.device, bucket_cap_mb: float) -> tuple[nn.Module, GatherBuckets]:
    """DDP over the trunk whose hook gathers instead of averaging."""
    ids = [device] if device.type == "cuda" else None
    ddp = DistributedDataParallel(trunk, device_ids=ids, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True)
    state = GatherBuckets(dist.get_world_size())
    ddp.register_comm_hook(None, state.hook)
    return ddp, state


def overlapped_step(
    ddp_trunk: nn.Module,
    state: GatherBuckets,
    modules: nn.ModuleDict,
    shapes: dict,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    rank_order: list[int],
    method: Method,
    seed: int,
    options: dict,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step with one task per rank; returns the task loss and the weights [K] in suite order.

    `rank_order[k]` is the rank that owns the suite's k-th task, so every method sees the
    tasks in suite order (the same order as the single-process reference).
    """
    (name,) = batches
    (loss,) = task_losses(ddp_trunk, modules, shapes, batches, autocast)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    by_rank = state.gram()
    gram = by_rank[rank_order][:, rank_order]
    w = method.weights(gram, seed=seed, **options)
    w_by_rank = torch.empty_like(w)
    w_by_rank[rank_order] = w
    state.apply(w_by_rank)
    optimizer.step()
    return loss.detach().view(1), w
