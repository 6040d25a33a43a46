"""How tasks' heads share what they learn (`model.heads`), one file per kind.

A head maps the trunk's output to a task's output. With a few dozen rows a task, a head fitted
from its own rows alone overfits at once; the sharing kinds pull each task's head toward what the
other tasks learned, as a mixed model's random effects are shrunk toward the fixed effects:

  separate            one head per task, from its own rows only
  shared_plus_offset  one head shared by every task of the same type and output width, plus a
                      per-task deviation of every one of its parameters, penalised by
                      `model.head_penalty` / (the task's train rows) x its squared norm (the neural
                      form of regularised multi-task learning, Evgeniou & Pontil 2004: the penalty
                      is the ratio of residual to random-effect variance of a mixed model)
  task_embedding      one head shared the same way, reading the trunk's output next to a learned
                      per-task embedding (penalised the same way)

The shared parts (`build_shared`, keyed by `group_key`) are held by every worker and summed over
workers at every step (`sync_shared_grads`); a task's own part lives on its owner, like today's
heads. A task head refers to its shared part without registering it, so a task's parameters and
state dict stay its own, and the shared parts are saved once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from distributed_mtml.collective import sum_grads
from distributed_mtml.heads import separate, shared_plus_offset, task_embedding

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


class TaskHead(Protocol):
    """What every kind's per-task head offers beside its forward."""

    def penalty(self) -> torch.Tensor | None: ...

    def standalone(self) -> nn.Module: ...


@dataclass(frozen=True)
class HeadKind:
    summary: str
    # (task's output width, config, trunk output width, its shared part or None, task's train rows) -> head
    task_head: Callable[..., TaskHead]
    # (output width, config, trunk output width) -> the part a group of tasks shares; None: nothing shared
    shared: Callable[[int, ModelConfig, int], nn.Module] | None = None
    params: tuple[str, ...] = ()  # keys of the `model` config section it takes
    # after each epoch: ({task: (its head, train features, train target)}, head_penalty, world, device,
    # the shared regression head's last layer or None, whether the dict holds every regression task
    # of this rank) -> the penalty used; a closed-form solve of what gradient steps fit slowly
    # (`shared_plus_offset.refit`)
    refit: Callable[[dict, float | str, int, torch.device, nn.Module | None, bool], float | None] | None = None


HEADS: dict[str, HeadKind] = {
    "separate": HeadKind("one head per task, fitted from its own rows", separate.task_head),
    "shared_plus_offset": HeadKind(
        "a head shared per task type plus an L2-penalised per-task offset (partial pooling)",
        shared_plus_offset.task_head, shared_plus_offset.shared, params=("head_penalty",),
        refit=shared_plus_offset.refit),
    "task_embedding": HeadKind(
        "a head shared per task type over the trunk's output and a learned task embedding",
        task_embedding.task_head, task_embedding.shared, params=("head_penalty", "embedding_dim")),
}


def group_key(task_type: str, out_width: int) -> str:
    """Tasks of one type and output width share a head: 'regression:1', 'classification:3'."""
    return f"{task_type}:{out_width}"


def build_shared(cfg: ModelConfig, groups: list[tuple[str, int]], trunk_out: int, seed: int) -> nn.ModuleDict:
    """The shared part of every (type, width) group the suite has, the same on every worker
    (seeded); empty for kinds that share nothing."""
    kind = HEADS[cfg.heads]
    if kind.shared is None:
        return nn.ModuleDict()
    torch.manual_seed(seed * 1000 - 1)
    return nn.ModuleDict({group_key(t, w): kind.shared(w, cfg, trunk_out) for t, w in sorted(set(groups))})


def sync_shared_grads(shared: nn.ModuleDict, world: int) -> None:
    """Each rank's shared-head gradient holds its own tasks' part of the suite's loss: one
    all-reduce sums them (a rank whose tasks do not use a group adds zeros), so every rank
    takes the same step and the shared heads stay equal, as DDP keeps the trunk."""
    sum_grads(list(shared.parameters()), world)
