"""MAML, first-order MAML, Reptile, ANIL and Meta-SGD as functions of a parameter dict.

All five share one inner loop: `adapt` takes `steps` gradient steps on a task's support set,
p <- p - rate * grad, on the parameters the algorithm adapts. They differ only in
  - which parameters adapt (ANIL: the head; the others: everything),
  - the rates (Meta-SGD: a learned rate per parameter entry; the others: `inner_lr`),
  - what the outer update differentiates (MAML, ANIL, Meta-SGD: through the adaptation,
    second order; first-order MAML: the query gradient at the adapted parameters, with the
    inner gradients detached; Reptile: no query loss at all, theta - phi is the gradient).

`meta_gradient` runs the inner loops of a whole meta-batch in one `torch.func.vmap` call; the
per-task `*_loop` functions are the learn2learn-style reference (one task at a time with
`torch.autograd.grad`), kept for the tests and the speed benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from distributed_mtml.meta.tasks import Episodes
from distributed_mtml.models import META_TASK, MultiTaskModel, TaskShape, task_loss

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    first_order: bool = False
    heads_only: bool = False
    learned_rates: bool = False
    reptile: bool = False


ALGORITHMS = {
    "maml": Algorithm(),
    "fomaml": Algorithm(first_order=True),
    "reptile": Algorithm(first_order=True, reptile=True),
    "anil": Algorithm(heads_only=True),
    "metasgd": Algorithm(learned_rates=True),
}


class MetaLearner(nn.Module):
    """The network (trunk + one head) and, for Meta-SGD, its learned inner rates.

    Meta-SGD's rates start U(0.005, 0.1) per entry, as in the paper; they are parameters of
    the outer update like the weights.
    """

    def __init__(self, model: MultiTaskModel, algorithm: str, inner_lr: float, seed: int = 0):
        super().__init__()
        if len(model.shared_heads):
            raise ValueError("a meta-learned model's one head is its own: build it with model.heads: separate")
        self.model, self.algorithm, self.inner_lr = model, ALGORITHMS[algorithm], inner_lr
        self.shape: TaskShape = model.tasks[META_TASK]
        head = f"task_modules.{META_TASK}.head."
        names = [n for n, _ in model.named_parameters()]
        self.adapted = [n for n in names if n.startswith(head)] if self.algorithm.heads_only else names
        rates = []
        if self.algorithm.learned_rates:
            generator = torch.Generator().manual_seed(seed)
            shapes = dict(model.named_parameters())
            rates = [nn.Parameter(0.005 + 0.095 * torch.rand(shapes[n].shape, generator=generator)) for n in self.adapted]
        self.rates = nn.ParameterList(rates)

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def rate(self) -> dict[str, torch.Tensor | float]:
        if self.algorithm.learned_rates:
            return dict(zip(self.adapted, self.rates))
        return {n: self.inner_lr for n in self.adapted}

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(self.shape, functional_call(self.model, params, (META_TASK, x)), y)

    def outputs(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (META_TASK, x))


def adapt(learner: MetaLearner, params: Params, xs: torch.Tensor, ys: torch.Tensor, steps: int,
          first_order: bool) -> Params:
    """One task's fast parameters after `steps` inner steps (unbatched; vmapped by callers)."""
    rate, fast = learner.rate(), dict(params)
    for _ in range(steps):
        sub = {n: fast[n] for n in learner.adapted}
        g = grad(lambda p: learner.loss({**fast, **p}, xs, ys))(sub)
        fast.update({n: sub[n] - rate[n] * (g[n].detach() if first_order else g[n]) for n in sub})
    return fast


def query_losses(learner: MetaLearner, episodes: Episodes, steps: int) -> torch.Tensor:
    """[B] query losses after adaptation, differentiable as the algorithm prescribes."""
    params, first_order = learner.params(), learner.algorithm.first_order

    def per_task(xs, ys, xq, yq):
        return learner.loss(adapt(learner, params, xs, ys, steps, first_order), xq, yq)

    return vmap(per_task)(episodes.xs, episodes.ys, episodes.xq, episodes.yq)


def reptile_step(learner: MetaLearner, episodes: Episodes, steps: int) -> tuple[Params, torch.Tensor]:
    """Per-parameter sums over the batch of theta - phi_b, and the [B] query losses at phi_b."""
    params = {n: p.detach() for n, p in learner.params().items()}

    def per_task(xs, ys, xq, yq):
        fast = adapt(learner, params, xs, ys, steps, first_order=True)
        return {n: params[n] - fast[n] for n in params}, learner.loss(fast, xq, yq)

    moves, losses = vmap(per_task)(episodes.xs, episodes.ys, episodes.xq, episodes.yq)
    return {n: m.sum(0) for n, m in moves.items()}, losses.detach()


def meta_gradient(learner: MetaLearner, episodes: Episodes, steps: int, total_tasks: int) -> torch.Tensor:
    """Writes into `.grad` this rank's share of the meta-gradient (its tasks' sum over
    `total_tasks`, so that an all-reduce SUM across ranks gives the meta-batch mean) and
    returns the [B] post-adaptation query losses."""
    learner.zero_grad(set_to_none=True)
    if learner.algorithm.reptile:
        moves, losses = reptile_step(learner, episodes, steps)
        for n, p in learner.model.named_parameters():
            p.grad = moves[n] / total_tasks
        return losses
    losses = query_losses(learner, episodes, steps)
    (losses.sum() / total_tasks).backward()
    return losses.detach()


def adaptation_curve(learner: MetaLearner, episodes: Episodes, steps: int) -> dict[str, torch.Tensor]:
    """Query loss (and accuracy for classification) after 0..steps inner steps: [B, steps + 1]."""
    params = {n: p.detach() for n, p in learner.params().items()}
    classify = learner.shape.type == "classification"

    def per_task(xs, ys, xq, yq):
        losses, hits, fast = [], [], params
        for step in range(steps + 1):
            if step:
                fast = adapt(learner, fast, xs, ys, 1, first_order=True)
            out = learner.outputs(fast, xq)
            losses.append(task_loss(learner.shape, out, yq))
            if classify:
                hits.append((out.argmax(-1) == yq).float().mean())
        return torch.stack(losses), torch.stack(hits) if classify else torch.stack(losses)

    with torch.no_grad():
        losses, hits = vmap(per_task)(episodes.xs, episodes.ys, episodes.xq, episodes.yq)
    return {"loss": losses, "accuracy": hits} if classify else {"loss": losses}


# --- the per-task reference: how learn2learn-style code computes the same thing -------------


def query_losses_loop(learner: MetaLearner, episodes: Episodes, steps: int) -> torch.Tensor:
    """`query_losses` one task at a time: clone, adapt with `autograd.grad`, score."""
    rate, second_order = learner.rate(), not learner.algorithm.first_order
    out = []
    for b in range(len(episodes)):
        fast = learner.params()
        for _ in range(steps):
            loss = learner.loss(fast, episodes.xs[b], episodes.ys[b])
            g = torch.autograd.grad(loss, [fast[n] for n in learner.adapted], create_graph=second_order)
            fast = {**fast, **{n: fast[n] - rate[n] * gi for n, gi in zip(learner.adapted, g)}}
        out.append(learner.loss(fast, episodes.xq[b], episodes.yq[b]))
    return torch.stack(out)


def meta_gradient_loop(learner: MetaLearner, episodes: Episodes, steps: int, total_tasks: int) -> torch.Tensor:
    """`meta_gradient` one task at a time."""
    learner.zero_grad(set_to_none=True)
    if not learner.algorithm.reptile:
        losses = query_losses_loop(learner, episodes, steps)
        (losses.sum() / total_tasks).backward()
        return losses.detach()
    params, losses = learner.params(), []
    for b in range(len(episodes)):
        fast = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        for _ in range(steps):
            g = torch.autograd.grad(learner.loss(fast, episodes.xs[b], episodes.ys[b]), [fast[n] for n in learner.adapted])
            fast.update({n: (fast[n] - learner.inner_lr * gi).detach().requires_grad_() for n, gi in zip(learner.adapted, g)})
        for n, p in params.items():
            move = (p.detach() - fast[n].detach()) / total_tasks
            p.grad = move if p.grad is None else p.grad + move
        losses.append(learner.loss(fast, episodes.xq[b], episodes.yq[b]).detach())
    return torch.stack(losses)
