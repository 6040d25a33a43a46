"""`task_embedding`: one head per task type and width, conditioned on a learned per-task
embedding e_t (`embedding_dim` wide, zero at start, penalised as `shared_plus_offset`'s offsets:
(head_penalty / n_t) ||e_t||^2). On the trunk's output f (after `model.head_hidden`):

    output = W f + b + e_t^T (B f + c)

so e_t moves the task's intercept (through c) and its slopes (through B). It is a mixed model's
random effects with a learned low-rank covariance: a task's deviation from the shared head lies
in the `embedding_dim`-dimensional span that B and c learn from every task, where
`shared_plus_offset` lets it move in every direction of the head's parameters. Tasks alike end
near each other in the embedding."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.layers import mlp

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig

AUTO = 10.0  # `head_penalty: auto` here (only shared_plus_offset learns it)


class Conditioned(nn.Module):
    """The shared part: hidden layers, the shared readout (W, b) and the embedding's (B, c)."""

    def __init__(self, in_width: int, out_width: int, cfg: ModelConfig):
        super().__init__()
        self.hidden = mlp(in_width, cfg.head_hidden, cfg.trunk)
        last = cfg.head_hidden[-1] if cfg.head_hidden else in_width
        self.readout = nn.Linear(last, out_width)
        self.modulation = nn.Linear(last, cfg.embedding_dim * out_width)
        self.dim, self.out_width = cfg.embedding_dim, out_width

    def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.hidden(features)
        modulated = self.modulation(h).view(len(h), self.dim, self.out_width)
        return self.readout(h) + torch.einsum("d,ndo->no", embedding.to(h.dtype), modulated)


def shared(out_width: int, cfg: ModelConfig, trunk_out: int) -> nn.Module:
    return Conditioned(trunk_out, out_width, cfg)


class EmbeddingHead(nn.Module):
    """The shared head, conditioned on this task's embedding."""

    def __init__(self, shared_part: nn.Module, dim: int, penalty: float | str, rows: int):
        super().__init__()
        object.__setattr__(self, "shared", shared_part)  # not registered: saved and synchronised once, apart
        penalty = AUTO if penalty in ("auto", "em") else float(penalty)  # em is shared_plus_offset's
        self.embedding = nn.Parameter(torch.zeros(dim), requires_grad=not math.isinf(penalty))
        self.strength = penalty / max(rows, 1) if not math.isinf(penalty) else 0.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.shared(features, self.embedding)

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
