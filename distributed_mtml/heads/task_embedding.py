"""`task_embedding`: one head per task type and width over [trunk output, e_t], with e_t a
learned `embedding_dim`-vector of task t (zero at start, penalised as `shared_plus_offset`'s
offsets: (head_penalty / n_t) ||e_t||^2). Tasks alike end near each other in the embedding.

The shared head has a hidden layer (`model.head_hidden`, else 32 units): without one, an
embedding could only shift each task's intercept, never its slopes."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from distributed_mtml.config import ModelConfig
from distributed_mtml.heads.separate import stack

HIDDEN = [32]


def shared(out_width: int, cfg: ModelConfig, trunk_out: int) -> nn.Module:
    hidden = cfg.model_copy(update={"head_hidden": cfg.head_hidden or HIDDEN})
    return stack(trunk_out + cfg.embedding_dim, out_width, hidden)


class EmbeddingHead(nn.Module):
    """The shared head reading the trunk's output and this task's embedding."""

    def __init__(self, shared_part: nn.Module, dim: int, penalty: float, rows: int):
        super().__init__()
        object.__setattr__(self, "shared", shared_part)  # not registered: saved and synchronised once, apart
        self.embedding = nn.Parameter(torch.zeros(dim), requires_grad=not math.isinf(penalty))
        self.strength = penalty / max(rows, 1) if not math.isinf(penalty) else 0.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.cat([features, self.embedding.to(features.dtype).expand(len(features), -1)], 1))

    def penalty(self) -> torch.Tensor | None:
        return self.strength * (self.embedding * self.embedding).sum() if self.strength else None

    def standalone(self) -> nn.Module:
        """A self-contained copy (the shared head and this embedding, both its own parameters)."""
        head = EmbeddingHead(copy.deepcopy(self.shared), len(self.embedding), 0.0, 1)
        head.register_module("net", head.shared)  # owned now: its parameters train with the copy
        with torch.no_grad():
            head.embedding.copy_(self.embedding)
        return head


def task_head(out_width: int, cfg: ModelConfig, trunk_out: int, shared: nn.Module | None, rows: int) -> nn.Module:
    return EmbeddingHead(shared, cfg.embedding_dim, cfg.head_penalty, rows)
