"""Training a built strategy on the K labelled examples, with its learning curve.

Full-batch steps (K is small); the validation split is scored before training and every
`eval_every` steps, and each point goes to `report` (MLflow, or Tune for ASHA, whose rungs are
these evaluations) as `val/<metric>`. With `test=True` the last point also carries
`test/<metric>`: the test split is scored once, after training, never during selection. Frozen parameters have `requires_grad=False`, so neither the
backward nor the optimiser touches them.
"""

from __future__ import annotations

from typing import Callable

import torch

from distributed_mtml.evaluate import split_metrics
from distributed_mtml.meta.algorithms import inner_step
from distributed_mtml.models import task_loss
from distributed_mtml.transfer.source import TransferInputs
from distributed_mtml.transfer.strategies import Built

Curve = list[tuple[int, dict[str, float]]]


def _evaluate(built: Built, inputs: TransferInputs, split: str) -> dict[str, float]:
    x, y = inputs.scored(split)
    built.model.eval()
    metrics = split_metrics(inputs.target, inputs.prep, [(x, y)], built.model, exact_rows=len(y))
    built.model.train()
    return {f"{split}/{k}": v for k, v in metrics.items()}


def fit(built: Built, inputs: TransferInputs, steps: int, lr: float, eval_every: int,
        report: Callable[[int, dict[str, float]], None] | None = None, forward: torch.nn.Module | None = None,
        test: bool = False) -> Curve:
    """`forward` (default: the model itself) computes the training loss: a DDP wrapper when
    several Ray Train workers share the fit, each on its shard of `inputs.train`."""
    forward = forward or built.model
    names = set(built.trainable)
    params = []
    for name, p in built.model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append((name, p))
    optimizer = torch.optim.Adam([p for _, p in params], lr=lr) if built.rates is None else None
    x, y = inputs.train
    curve: Curve = []

    def record(step: int) -> None:
        metrics = _evaluate(built, inputs, "val")
        if test and step == steps:
            metrics.update(_evaluate(built, inputs, "test"))
        curve.append((step, metrics))
        if report is not None:
            report(step, metrics)

    record(0)
    for step in range(1, steps + 1):
        loss = task_loss(inputs.target, forward(x), y)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:  # the meta-learned inner rule
            grads = dict(zip([n for n, _ in params], torch.autograd.grad(loss, [p for _, p in params])))
            with torch.no_grad():
                moved = inner_step(dict(params), grads, built.rates)
                for name, p in params:
                    p.copy_(moved[name])
        if step % eval_every == 0 or step == steps:
            record(step)
    return curve
