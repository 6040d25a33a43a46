"""How tasks share the network under their heads (`model.architecture`), one file per kind.

  hard   one trunk whose output every task's head reads (hard parameter sharing)
  mmoe   several experts, each a network of the trunk's shape, and a softmax gate per task that
         weighs their outputs for each row (Ma et al., KDD 2018)
  cgc    mmoe's shared experts plus experts of each task's own, its gate over both (Tang et al.,
         RecSys 2020)
  ple    cgc levels stacked, one per width of `model.trunk.widths`, each expert one layer: a shared
         path through the shared experts and a path per task through its own and the shared ones
         (the same article)
  cross_stitch  a column of the trunk's layers per task, mixed after every layer by a learned
         tasks x tasks matrix (Misra et al., CVPR 2016)

Every kind has two parts. The shared part (what `models.build_trunk` returns, "the trunk") is on
every worker and synchronised as the trunk always was: DDP averages its gradients, and the
conflict-aware methods see each task's gradient of it. Its output is one tensor [rows, width]
(for gated kinds every expert's output side by side), so DDP's wrapper, the `representation`
gradients (taken at the experts' outputs) and the chunked forwards take it as they take a
trunk's. The task part (a gate, a task's own experts) is in the task's module, on the worker
that owns the task, and turns (the task's input, the shared output) into what its head reads.
A head reads the same width under every kind: the trunk's last width, then the input where
`model.trunk.passthrough` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

from distributed_mtml.architectures import cgc, cross_stitch, hard, mmoe, ple

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


@dataclass(frozen=True)
class Architecture:
    summary: str
    shared: Callable[[ModelConfig, int, int], nn.Module]  # (config, input width, tasks) -> the part every worker holds
    # (config, input width, the task's index in the suite, tasks) -> a task's own part, called as part(inputs, shared
    # output); None: the head reads the shared output as it is
    task_part: Callable[[ModelConfig, int, int, int], nn.Module] | None = None
    # the known tasks' parts -> a part for a task the model was not trained on (a new group), from what they share
    new_task_part: Callable[[list[nn.Module]], nn.Module] | None = None
    params: tuple[str, ...] = ()  # keys of the `model` config section it takes
    meta: bool = False  # whether meta-learning can train it (its loops adapt a trunk and one head)
    max_tasks: int | None = None  # the most tasks it can take (cross_stitch: a column each)
    # (config, tasks) -> the metric keys a task adds each epoch for what it learned of the others (`gates.epoch_metrics`)
    relation_keys: Callable[[ModelConfig, int], int] = lambda cfg, tasks: 0


ARCHITECTURES: dict[str, Architecture] = {
    "hard": Architecture("one trunk shared by every task (hard parameter sharing)", hard.shared, meta=True),
    "mmoe": Architecture("shared experts and a softmax gate per task over them (Ma et al., KDD 2018)", mmoe.shared,
                         mmoe.task_part, mmoe.new_task_part, params=("experts",),
                         relation_keys=lambda cfg, tasks: cfg.experts),
    "cgc": Architecture("shared experts plus each task's own, a gate per task over both (Tang et al., RecSys 2020)",
                        mmoe.shared, cgc.task_part, cgc.new_task_part, params=("experts", "task_experts"),
                        relation_keys=lambda cfg, tasks: cfg.experts + 1),
    "ple": Architecture("cgc levels stacked, one a model.trunk width, shared and task paths (Tang et al., RecSys 2020)",
                        ple.shared, ple.task_part, ple.new_task_part, params=("experts", "task_experts"),
                        relation_keys=lambda cfg, tasks: cfg.experts + 1),
    "cross_stitch": Architecture("a column of the trunk's layers per task, mixed after every layer by a learned "
                                 "tasks x tasks matrix (Misra et al., CVPR 2016)", cross_stitch.shared,
                                 cross_stitch.task_part, cross_stitch.new_task_part, max_tasks=cross_stitch.MAX_TASKS,
                                 relation_keys=lambda cfg, tasks: tasks),
}
