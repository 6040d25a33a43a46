"""`mmoe`: Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018).

`model.experts` networks of the trunk's shape (`model.trunk`: by default the article's
10 -> 100 -> 50) read every row; each task has a gate, a linear map of its input to one logit
per expert, and its head reads the softmax-weighted sum of the experts' outputs. Tasks that
weigh the same experts share what those learn; tasks that conflict can draw on different ones.
Gates start at zero: every task begins with the experts' plain mean. With one expert, a task
reads that expert's output: hard sharing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_mtml.layers import mlp, with_input

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig


class Experts(nn.Module):
    """Networks of one output width side by side on the same rows: [rows, count x width]."""

    passes_input = 0  # its output holds no column of its input

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(x) for expert in self.experts], -1)


def experts(cfg: ModelConfig, in_width: int, count: int, widths: list[int] | None = None) -> Experts:
    """`count` networks of `widths` (default: the trunk's), each with the trunk's norm,
    activation and dropout."""
    return Experts([mlp(in_width, widths or cfg.trunk.widths, cfg.trunk) for _ in range(count)])


def shared(cfg: ModelConfig, in_width: int, tasks: int) -> Experts:
    return experts(cfg, in_width, cfg.experts)


class Gate(nn.Module):
    """A task's softmax weights over experts, from its input, and the weighted sum of their
    outputs (then the input itself, with `model.trunk.passthrough`)."""

    def __init__(self, in_width: int, count: int, width: int, passthrough: bool):
        super().__init__()
        self.gate = nn.Linear(in_width, count)
        nn.init.zeros_(self.gate.weight), nn.init.zeros_(self.gate.bias)  # the experts' mean at first
        self.count, self.width, self.passthrough = count, width, passthrough

    def weights(self, inputs: torch.Tensor) -> torch.Tensor:
        """[rows, experts], each row summing to 1."""
        return torch.softmax(self.gate(inputs), -1)

    def mixed(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """`outputs` [rows, count x width], weighted by the gate: [rows, width] (and the input)."""
        w = self.weights(inputs).to(outputs.dtype)
        mixed = torch.bmm(w.unsqueeze(1), outputs.view(len(outputs), self.count, self.width)).squeeze(1)
        return with_input(mixed, inputs, self.passthrough)

    def forward(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        return self.mixed(inputs, shared_output)

    def shared_weights(self, inputs: torch.Tensor, shared_output: torch.Tensor) -> torch.Tensor:
        """What the task draws from each shared expert, [rows, experts]: how tasks relate
        (`gates.py` compares tasks by it)."""
        return self.weights(inputs)

    def with_own_column(self, inputs: torch.Tensor, own: int) -> torch.Tensor:
        """The weights with the last `own` experts (a task's own, no other task's) as one column:
        [rows, shared experts + 1], what `gates.py` compares tasks by under cgc and ple."""
        w = self.weights(inputs)
        return torch.cat([w[:, : self.count - own], w[:, self.count - own :].sum(-1, keepdim=True)], -1)

    @classmethod
    def averaged(cls, gates: list["Gate"], count: int, passthrough: bool) -> "Gate":
        """A gate over the first `count` experts whose logits are the mean of `gates`' for them
        (logits linear in the input: the mean of the weights and biases): a new task's, from
        what the known tasks' gates have in common, as a shared head with zero offsets is."""
        first = gates[0]
        gate = cls(first.gate.in_features, count, first.width, passthrough)
        with torch.no_grad():
            gate.gate.weight.copy_(torch.stack([g.gate.weight[:count] for g in gates]).mean(0))
            gate.gate.bias.copy_(torch.stack([g.gate.bias[:count] for g in gates]).mean(0))
        return gate


def task_part(cfg: ModelConfig, in_width: int, index: int, tasks: int) -> Gate:
    return Gate(in_width, cfg.experts, cfg.trunk.widths[-1], cfg.trunk.passthrough)


def new_task_part(known: list[Gate]) -> Gate:
    """A task the model was not trained on: the known tasks' gates averaged."""
    return Gate.averaged(known, known[0].count, known[0].passthrough)
