"""Per-task evaluation metrics: `accuracy`, `auc` (classification), `mse`, `mae`, `r2` (regression), and the loss."""

from __future__ import annotations

import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import Moments
from distributed_mtml.models import TaskShape, task_loss
from distributed_mtml.segments import row_tasks, segment_means

METRICS = {"classification": ("accuracy", "auc"), "regression": ("mse", "mae", "r2")}  # a task's, beside its loss


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC as the Mann-Whitney statistic, ties counted half, from ranks: one sort and
    O(n) memory (comparing every positive with every negative took 5 GB at 25k x 25k rows).
    Tied scores share their average rank, which is exactly the half-counted tie."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ordered, order = scores.double().sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, per tie group
    ranks = torch.empty_like(ordered)
    ranks[order] = average_rank[group]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    probs = logits.softmax(-1)
    accuracy = float((logits.argmax(-1) == labels).double().mean())
    aucs = [binary_auc(probs[:, c], (labels == c).long()) for c in range(1, logits.shape[-1])]
    if logits.shape[-1] > 2:  # macro one-vs-rest
        aucs = [binary_auc(probs[:, c], (labels == c).long()) for c in range(logits.shape[-1])]
    return {"accuracy": accuracy, "auc": sum(aucs) / len(aucs)}


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    pred = pred.squeeze(-1).double()
    target = target.double()
    err = pred - target
    var = ((target - target.mean()) ** 2).mean()
    mse = float((err**2).mean())
    return {"mse": mse, "mae": float(err.abs().mean()), "r2": float(1 - mse / var) if var > 0 else float("nan")}


def task_metrics(task: TaskShape, output: torch.Tensor, target: torch.Tensor,
                 prep: TaskPrep | None = None) -> dict[str, float]:
    """The task's metrics plus its loss, all as plain floats. `output` and `target` are on the
    model's (standardised) scale; `prep` puts regression metrics back in the target's units,
    while the loss stays on the model's scale, comparable across tasks."""
    output, target = output.detach().cpu(), target.detach().cpu()
    if task.type == "classification":
        metrics = classification_metrics(output, target)
    else:
        units = prep.target_units if prep is not None else (lambda v: v)
        metrics = regression_metrics(units(output.double()), units(target.double()))
    metrics["loss"] = float(task_loss(task, output, target))
    return metrics


def regression_metrics_by_task(outputs: list[torch.Tensor], targets: list[torch.Tensor],
                               preps: list[TaskPrep | None]) -> list[dict[str, float]]:
    """`task_metrics` of many regression tasks at once: their rows joined with a task id and every
    sum a segment reduction (`segments`), so that a thousand tasks' validation costs a few
    tensor operations, not a thousand calls (tested equal to the loop)."""
    sizes = [len(t) for t in targets]
    ids = row_tasks(sizes)
    out = torch.cat([o.detach().cpu().reshape(-1) for o in outputs]) if outputs else torch.zeros(0)
    target = torch.cat([t.detach().cpu().reshape(-1) for t in targets]) if targets else torch.zeros(0)
    scale = torch.tensor([p.target_std if p is not None else 1.0 for p in preps], dtype=torch.float64)[ids]
    shift = torch.tensor([p.target_mean if p is not None else 0.0 for p in preps], dtype=torch.float64)[ids]

    def per_task(values: torch.Tensor) -> torch.Tensor:
        return segment_means(values.double(), ids, sizes)

    loss = per_task((out.float() - target.float()) ** 2)  # on the model's scale, as `task_loss`
    pred, truth = out.double() * scale + shift, target.double() * scale + shift
    mse, mae = per_task((pred - truth) ** 2), per_task((pred - truth).abs())
    var = per_task((truth - per_task(truth)[ids]) ** 2)
    r2 = torch.where(var > 0, 1 - mse / var, torch.full_like(var, float("nan")))
    return [{"mse": float(mse[k]), "mae": float(mae[k]), "r2": float(r2[k]), "loss": float(loss[k])}
            for k in range(len(targets))]


AUC_BINS = 1 << 16
EXACT_ROWS = 1 << 18  # a split up to this size has its outputs held: every metric exact, AUC too


class StreamedMetrics:
    """A task's metrics over a split seen batch by batch, in memory that does not grow with it.

    Up to `exact_rows` (`EXACT_ROWS`) rows the outputs are held (a few MB) and the result is `task_metrics`,
    exact, however small the batches. Beyond that everything but AUC is still exact: losses, hits
    and errors are sums, and the target's spread (for r2) is combined batch by batch. AUC is then
    taken from each class's predicted probability counted in `AUC_BINS` equal bins, a positive and
    a negative in one bin counting half: it differs from the exact value by at most the share of
    positive-negative pairs whose probabilities fall in one bin (1/65536 wide)."""

    def __init__(self, task: TaskShape, prep: TaskPrep | None = None, exact_rows: int = EXACT_ROWS):
        self.task, self.prep, self.n, self.loss, self.exact_rows = task, prep, 0, 0.0, exact_rows
        self.hits, self.squared, self.absolute = 0, 0.0, 0.0
        self.target = Moments(1)
        self.held: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # None once past EXACT_ROWS
        self.bins = torch.zeros(0)  # class, negative/positive, bin: made past `exact_rows` (2 MB a task; a
        # thousand tasks' metrics are taken at once, `evaluate.tasks_metrics`)

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output, target = output.detach().cpu(), target.detach().cpu()
        if self.held is not None:
            self.held.append((output, target))
            if sum(len(t) for _, t in self.held) <= self.exact_rows:
                return
            held, self.held = self.held, None  # too many to hold: sums and bins from here on
            self.bins = torch.zeros(self.task.num_classes or 2, 2, AUC_BINS, dtype=torch.float64)
            for o, t in held:
                self._accumulate(o, t)
            return
        self._accumulate(output, target)

    def _accumulate(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.n += len(target)
        self.loss += float(task_loss(self.task, output, target)) * len(target)
        if self.task.type == "classification":
            self.hits += int((output.argmax(-1) == target).sum())
            probs = output.float().softmax(-1)
            index = (probs * AUC_BINS).long().clamp_(max=AUC_BINS - 1)
            for c in range(probs.shape[-1]):
                positive = (target == c).long()
                self.bins[c].index_put_((positive, index[:, c]), torch.ones(len(target), dtype=torch.float64),
                                        accumulate=True)
            return
        units = self.prep.target_units if self.prep is not None else (lambda v: v)
        pred, truth = units(output.squeeze(-1).double()), units(target.double())
        self.squared += float(((pred - truth) ** 2).sum())
        self.absolute += float((pred - truth).abs().sum())
        self.target.add(truth.numpy())

    def result(self) -> dict[str, float]:
        if self.held is not None:
            outputs, targets = zip(*self.held) if self.held else ([], [])
            return task_metrics(self.task, torch.cat(outputs), torch.cat(targets), self.prep)
        metrics = {"loss": self.loss / self.n}
        if self.task.type == "classification":
            classes = range(1, len(self.bins)) if len(self.bins) == 2 else range(len(self.bins))
            aucs = [_binned_auc(self.bins[c]) for c in classes]
            return {"accuracy": self.hits / self.n, "auc": sum(aucs) / len(aucs), **metrics}
        mse, var = self.squared / self.n, float(self.target.m2[0]) / self.n
        return {"mse": mse, "mae": self.absolute / self.n, "r2": 1 - mse / var if var > 0 else float("nan"), **metrics}


def _binned_auc(bins: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) from [negative, positive] bin counts, pairs in
    one bin counted half."""
    negative, positive = bins[0], bins[1]
    n_neg, n_pos = float(negative.sum()), float(positive.sum())
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    below = torch.cumsum(negative, 0) - negative  # negatives in lower bins
    return float((positive * (below + negative / 2)).sum()) / (n_pos * n_neg)
