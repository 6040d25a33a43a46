"""Plain-text tables and learning-curve plots shown to the user."""

from __future__ import annotations

import os

from distributed_mtml.per_task import split_key


def table(headers: list[str], rows: list[list]) -> str:
    """A left-aligned text table; floats printed with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _per_task(metrics: dict[str, float], split: str) -> dict[str, dict[str, float]]:
    per_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = split_key(key)
        if parts is not None and parts[0] == split:
            per_task.setdefault(parts[1], {})[parts[2]] = value
    return per_task


def metrics_table(metrics: dict[str, float], split: str, baseline: dict[str, float] | None = None) -> str:
    """Rows of `<split>/<task>/<metric>` keys: one row per task, one column per metric. With
    `baseline` (the trivial predictor's metrics, same keys), its loss beside the model's and
    'NO' where the model's loss is not below it."""
    per_task = _per_task(metrics, split)
    names = ["loss", "accuracy", "auc", "mse", "mae", "r2"]
    columns = [n for n in names if any(n in m for m in per_task.values())]
    rows = [[task, *(m.get(c, "") for c in columns)] for task, m in sorted(per_task.items())]
    if baseline is None:
        return table(["task", *columns], rows)
    trivial = _per_task(baseline, split)
    for row in rows:
        base = trivial.get(row[0], {}).get("loss", float("nan"))
        row += [base, "yes" if per_task[row[0]].get("loss", float("inf")) < base else "NO"]
    return table(["task", *columns, "trivial loss", "beats trivial"], rows)


SHOWN = 5  # worst and best tasks named beside the summary of many


def tasks_summary(metrics: dict[str, float], split: str) -> str:
    """Many tasks' `<split>/<task>/<metric>` as a table of their spread across tasks (one row per
    metric), then the worst and best tasks by loss: a line per task would not be read."""
    from distributed_mtml import per_task

    summary, rows = per_task.summarize({k: v for k, v in metrics.items() if k.startswith(f"{split}/")})
    names = [n for n in ("loss", "accuracy", "auc", "mse", "mae", "r2") if per_task.summary_key(split, n, "mean") in summary]
    rows_out = [[n, *(summary[per_task.summary_key(split, n, s)] for s in per_task.STATS)] for n in names]
    lines = [f"{len(rows)} tasks", table(["metric", *per_task.STATS], rows_out)]
    worst, best = per_task.ranked(rows, f"{split}/loss", "loss", SHOWN)
    lines.append(f"worst by loss: {', '.join(f'{t} {v:.4f}' for t, v in worst)}")
    lines.append(f"best by loss:  {', '.join(f'{t} {v:.4f}' for t, v in best)}")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (workers and servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(
    histories: dict[str, dict[str, list[tuple[int, float]]]],
    out_dir: str,
    x_label: str = "epoch",
    y_label: str = "loss",
) -> list[str]:
    """One PNG per task with its train and validation loss per MLflow step; returns the paths.
    Epochs are logged from 0 and shown from 1; any other step is shown as logged."""
    plt = pyplot()
    shift = 1 if x_label == "epoch" else 0
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for task, curves in sorted(histories.items()):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, points in sorted(curves.items()):
            ax.plot([s + shift for s, _ in points], [v for _, v in points], marker="o", label=label)
        ax.set(title=f"task {task}", xlabel=x_label, ylabel=y_label)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}.png")  # a group task's in its entry's folder: plots/<entry>/<value>.png
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def adaptation_plot(means: list[float], cis: list[float], title: str, y_label: str, path: str) -> str:
    """Query metric against adaptation steps, with the 95% confidence band."""
    plt = pyplot()
    steps = list(range(len(means)))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, means, marker="o")
    ax.fill_between(steps, [m - c for m, c in zip(means, cis)], [m + c for m, c in zip(means, cis)], alpha=0.25)
    ax.set(title=title, xlabel="adaptation steps", ylabel=y_label)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart(labels: list[str], means: list[float], cis: list[float], title: str, path: str) -> str:
    """One bar per label with its 95% interval as an error bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels)), 3.5))
    ax.bar(labels, means, yerr=[0 if c != c else c for c in cis], capsize=4)
    ax.set(title=title)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
