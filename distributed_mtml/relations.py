"""Task relations: TAG inter-task affinity, gradient cosine similarity, and groupings.

Affinity of source task i onto recipient j (Fifty et al., "Efficiently Identifying Task
Groupings for Multi-Task Learning", NeurIPS 2021): take one SGD step of the shared trunk on
task i's loss alone and see how task j's loss on the same batch moves,
    Z[i -> j] = (1 - L_j(theta - lr g_i) / L_j(theta)) / lr,
positive when training on i helps j. Across workers: the task gradients g_i are all-gathered
(the same exchange as conflict-aware aggregation) and the worker owning j evaluates the K
lookahead losses of j. Cosine similarity is read off the same Gram matrix.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from distributed_mtml.aggregation.exchange import gather_task_grads, task_trunk_gradients
from distributed_mtml.models import task_loss


def measure(
    trunk: nn.Module,
    modules: nn.ModuleDict,
    shapes: dict,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    placement: list[list[str]],
    order: list[str],
    lr: float,
) -> dict[str, float]:
    """One measurement on the current batches: `relations/affinity/<src>/<dst>` for the tasks
    this worker owns as recipients, and `relations/cosine/<a>/<b>` for every pair."""
    losses, local = task_trunk_gradients(trunk, modules, shapes, batches)
    grads = gather_task_grads(local, placement, order) if len(placement) > 1 else local
    gram = grads.double() @ grads.double().T
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-30))
    cos = gram / torch.outer(norms, norms)
    out = {f"relations/cosine/{a}/{b}": float(cos[i, j]) for i, a in enumerate(order) for j, b in enumerate(order)}
    named = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
    flat = parameters_to_vector([p for _, p in named]).detach()
    before = {n: loss.item() for n, loss in zip(batches, (loss.detach() for loss in losses))}
    with torch.no_grad():
        for i, src in enumerate(order):
            shifted = torch.split(flat - lr * grads[i], [p.numel() for _, p in named])
            params = {n: t.view_as(p) for (n, p), t in zip(named, shifted)}
            for dst, (x, y) in batches.items():
                after = task_loss(shapes[dst], modules[dst](lambda z, moved=params: functional_call(trunk, moved, (z,)), x), y)
                out[f"relations/affinity/{src}/{dst}"] = (1 - float(after) / max(before[dst], 1e-12)) / lr
    return out


def matrix(values: dict[str, float], kind: str, order: list[str]) -> np.ndarray:
    """[K, K] matrix (row = source, column = recipient) from `relations/<kind>/<a>/<b>` keys."""
    out = np.full((len(order), len(order)), np.nan)
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            key = f"relations/{kind}/{a}/{b}"
            if key in values:
                out[i, j] = values[key]
    return out


def _group_score(affinity: np.ndarray, members: tuple[int, ...]) -> float:
    """TAG's rule: each member is scored by the mean affinity onto it from the other members;
    a task alone scores -1e6, so groupings avoid singletons when they can."""
    if len(members) == 1:
        return -1e6
    return sum(np.mean([affinity[b, a] for b in members if b != a]) for a in members)


def _partitions(items: list[int], groups: int):
    """Every split of `items` into exactly `groups` non-empty blocks."""
    if groups == 1:
        yield [tuple(items)]
        return
    if len(items) == groups:
        yield [(i,) for i in items]
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest, groups - 1):  # first alone
        yield [(first,), *part]
    for part in _partitions(rest, groups):  # first joins a block
        for k in range(len(part)):
            yield [*part[:k], (first, *part[k]), *part[k + 1 :]]


EXHAUSTIVE_UP_TO = 12


def best_grouping(affinity: np.ndarray, groups: int) -> tuple[list[tuple[int, ...]], float]:
    """The split into `groups` groups with the highest mean per-task score.

    Exhaustive over all partitions up to 12 tasks; beyond that a greedy heuristic: start from
    singletons and repeatedly merge the two groups whose union scores best, until `groups` remain.
    """
    k = len(affinity)
    if k <= EXHAUSTIVE_UP_TO:
        cache: dict[tuple[int, ...], float] = {}

        def score(part):
            return sum(cache.setdefault(m, _group_score(affinity, m)) for m in part) / k

        best = max(_partitions(list(range(k)), groups), key=score)
        return sorted(best), score(best)
    part = [(i,) for i in range(k)]
    while len(part) > groups:
        a, b = max(itertools.combinations(range(len(part)), 2),
                   key=lambda ab: _group_score(affinity, part[ab[0]] + part[ab[1]]))
        part = [g for i, g in enumerate(part) if i not in (a, b)] + [tuple(sorted(part[a] + part[b]))]
    return sorted(part), sum(_group_score(affinity, m) for m in part) / k


def to_csv(values: np.ndarray, order: list[str]) -> str:
    lines = ["source," + ",".join(order)]
    lines += [f"{a}," + ",".join(f"{v:.6g}" for v in row) for a, row in zip(order, values)]
    return "\n".join(lines) + "\n"


def from_csv(text: str) -> tuple[np.ndarray, list[str]]:
    rows = [line.split(",") for line in text.strip().splitlines()]
    order = rows[0][1:]
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]]), order


def heatmap(values: np.ndarray, order: list[str], title: str, path: str) -> None:
    from distributed_mtml.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(order) + 2, 1.0 * len(order) + 1.5))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-np.nanmax(np.abs(values)), vmax=np.nanmax(np.abs(values)))
    ax.set(xticks=range(len(order)), yticks=range(len(order)), xlabel="recipient", ylabel="source", title=title)
    ax.set_xticklabels(order, rotation=45, ha="right")
    ax.set_yticklabels(order)
    for i in range(len(order)):
        for j in range(len(order)):
            ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=8)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
