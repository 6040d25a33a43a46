"""MAML, first-order MAML, Reptile, ANIL, Meta-SGD and a closed-form head as functions of a
parameter dict.

`ridge_head` (regression) adapts in closed form instead: the head's last layer is solved on the
K support rows, ridge toward the meta-learned last layer w0 with a learned prior precision per
feature (`rates`: their logs), w = w0 + (F'F + diag(p))^-1 F'(y - F w0) for the support rows'
last-layer inputs F, a Bayesian last layer's posterior mean: the neural form of a new group's
BLUP (Harrison et al., ALPaCA, 2018; Bertinetto et al., ICLR 2019). The outer update
differentiates the query loss through the solve, so the trunk learns features in which a new
task's K labels say the most. Any number of steps is the same one solve.

The others share one inner loop: `adapt` takes `steps` gradient steps on a task's support set,
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
    summary: str
    first_order: bool = False
    heads_only: bool = False
    learned_rates: bool = False
    reptile: bool = False
    closed_form: bool = False  # the last layer solved on the support rows (`solve_last_layer`)


ALGORITHMS = {
    "maml": Algorithm("MAML: second-order meta-gradient through the inner steps (Finn et al. 2017)"),
    "fomaml": Algorithm("first-order MAML: the query gradient at the adapted weights (Finn et al. 2017)",
                        first_order=True),
    "reptile": Algorithm("Reptile: move toward the adapted weights (Nichol et al. 2018)", first_order=True,
                         reptile=True),
    "anil": Algorithm("ANIL: adapt the head only, the trunk is shared as learned (Raghu et al. 2020)", heads_only=True),
    "metasgd": Algorithm("Meta-SGD: a learned inner rate per parameter entry (Li et al. 2017)", learned_rates=True),
    "ridge_head": Algorithm("regression: the head's last layer solved in closed form on the K rows, a ridge toward "
                            "the meta-learned layer with a learned prior precision per input", closed_form=True),
}
LAST = f"task_modules.{META_TASK}.head.1."  # the head's last layer (`heads.separate.stack`)


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
        if self.algorithm.closed_form:
            if self.shape.type != "regression":
                raise ValueError("ridge_head adapts a regression head; classification needs a gradient-step algorithm")
            self.adapted = [f"{LAST}weight", f"{LAST}bias"]
            width = dict(model.named_parameters())[f"{LAST}weight"].shape[1] + 1
            rates = [nn.Parameter(torch.zeros(width))]  # log prior precision per last-layer input and the bias
        elif self.algorithm.learned_rates:
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

    def last_inputs(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """What the head's last layer reads: adapter, trunk and the head's hidden layers."""
        module = self.model.task_modules[META_TASK]

        def part(prefix: str) -> Params:
            return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}

        z = functional_call(module.adapter, part(f"task_modules.{META_TASK}.adapter."), (x,))
        z = functional_call(self.model.trunk, part("trunk."), (z,))
        return functional_call(module.head[0], part(f"task_modules.{META_TASK}.head.0."), (z,))


def solve_last_layer(learner: MetaLearner, params: Params, xs: torch.Tensor, ys: torch.Tensor) -> Params:
    """`ridge_head`'s adaptation (see the module docstring), in the K x K form of the solve
    (Woodbury: K support rows are fewer than the last layer's inputs)."""
    f = learner.last_inputs(params, xs)
    f = torch.cat([f, torch.ones_like(f[:, :1])], 1)  # [K, d + 1]
    w0 = torch.cat([params[f"{LAST}weight"].reshape(-1), params[f"{LAST}bias"].reshape(-1)])
    spread = torch.exp(-learner.rates[0])  # the prior's variance per weight
    gram = (f * spread) @ f.T + torch.eye(len(f), dtype=f.dtype, device=f.device)
    w = w0 + spread * (f.T @ torch.linalg.solve(gram, ys - f @ w0))
    return {**params, f"{LAST}weight": w[:-1].view_as(params[f"{LAST}weight"]),
            f"{LAST}bias": w[-1:].view_as(params[f"{LAST}bias"])}


def inner_step(params: Params, grads: Params, rate: Params) -> Params:
    """The inner rule's one step, the same in meta-training, evaluation, `predict --adapt-from` and
    transfer's `meta_adapt`: each adapted parameter moves against its gradient at its own rate
    (a scalar, or Meta-SGD's learned entry-wise rates)."""
    return {n: params[n] - rate[n] * grads[n] for n in grads}


def adapt(learner: MetaLearner, params: Params, xs: torch.Tensor, ys: torch.Tensor, steps: int,
          first_order: bool) -> Params:
    """One task's fast parameters after `steps` inner steps (unbatched; vmapped by callers)."""
    if learner.algorithm.closed_form:
        return solve_last_layer(learner, params, xs, ys) if steps else dict(params)
    rate, fast = learner.rate(), dict(params)
    for _ in range(steps):
        sub = {n: fast[n] for n in learner.adapted}
        g = grad(lambda p: learner.loss({**fast, **p}, xs, ys))(sub)
        fast.update(inner_step(sub, {n: g[n].detach() if first_order else g[n] for n in sub}, rate))
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
    """Query loss (and accuracy for classification) after 0..steps inner steps: [B, steps + 1].
    Regression also has `support_mean` [B, 1], the anchor that says whether steps pay: the
    unadapted prediction shifted by the support rows' mean residual (a new group's intercept
    from its K labels, nothing learned)."""
    params = {n: p.detach() for n, p in learner.params().items()}
    classify = learner.shape.type == "classification"

    def per_task(xs, ys, xq, yq):
        losses, hits, fast = [], [], params
        for step in range(steps + 1):
            if step:  # one step on from the last (a closed-form head: the one solve, from the start)
                fast = adapt(learner, params, xs, ys, 1, True) if learner.algorithm.closed_form else \
                    adapt(learner, fast, xs, ys, 1, first_order=True)
            out = learner.outputs(fast, xq)
            losses.append(task_loss(learner.shape, out, yq))
            if classify:
                hits.append((out.argmax(-1) == yq).float().mean())
        if classify:
            return torch.stack(losses), torch.stack(hits)
        shift = (ys - learner.outputs(params, xs).squeeze(-1)).mean()
        return torch.stack(losses), task_loss(learner.shape, learner.outputs(params, xq) + shift, yq).unsqueeze(0)

    with torch.no_grad():
        losses, other = vmap(per_task)(episodes.xs, episodes.ys, episodes.xq, episodes.yq)
    return {"loss": losses, "accuracy": other} if classify else {"loss": losses, "support_mean": other}


# --- the per-task reference: how learn2learn-style code computes the same thing -------------


def query_losses_loop(learner: MetaLearner, episodes: Episodes, steps: int) -> torch.Tensor:
    """`query_losses` one task at a time: clone, adapt with `autograd.grad`, score."""
    rate, second_order = learner.rate(), not learner.algorithm.first_order
    out = []
    for b in range(len(episodes)):
        fast, inner = learner.params(), steps
        if learner.algorithm.closed_form and steps:
            fast, inner = _solve_directly(learner, fast, episodes.xs[b], episodes.ys[b]), 0
        for _ in range(inner):
            loss = learner.loss(fast, episodes.xs[b], episodes.ys[b])
            g = torch.autograd.grad(loss, [fast[n] for n in learner.adapted], create_graph=second_order)
            fast = {**fast, **inner_step(fast, dict(zip(learner.adapted, g)), rate)}
        out.append(learner.loss(fast, episodes.xq[b], episodes.yq[b]))
    return torch.stack(out)


def _solve_directly(learner: MetaLearner, params: Params, xs: torch.Tensor, ys: torch.Tensor) -> Params:
    """`solve_last_layer` as written: the (d + 1) x (d + 1) system F'F + diag(p)."""
    f = learner.last_inputs(params, xs)
    f = torch.cat([f, torch.ones_like(f[:, :1])], 1)
    w0 = torch.cat([params[f"{LAST}weight"].reshape(-1), params[f"{LAST}bias"].reshape(-1)])
    w = w0 + torch.linalg.solve(f.T @ f + torch.diag(torch.exp(learner.rates[0])), f.T @ (ys - f @ w0))
    return {**params, f"{LAST}weight": w[:-1].view_as(params[f"{LAST}weight"]),
            f"{LAST}bias": w[-1:].view_as(params[f"{LAST}bias"])}


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
