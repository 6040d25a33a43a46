"""What a gated architecture (`architectures/`: mmoe, cgc, ple) learned about how its tasks relate:
each task's mean weight on every shared expert over a split's rows, and how alike two tasks'
weights are. Tasks that draw on the same experts share what those learn; this is the learned
counterpart of TAG's measured affinity (`relations.py`), set beside it by `mtml affinity`.

Similarity of two tasks' mean weights p and q (each summing to 1): the Bhattacharyya
coefficient sum_e sqrt(p_e q_e), 1 for the same weights and 0 for experts no task shares.
Under cgc and ple (its last level) the last column is a task's own experts together, which no other task draws on: it
counts in each task's weights but matches nothing.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.stream import tasks_split_batches
from distributed_mtml.data.tasks import load_suite_spec
from distributed_mtml.models import MultiTaskModel

OWN = "own experts"  # cgc's last column


def stitch(model: MultiTaskModel) -> np.ndarray | None:
    """Cross-stitch's last mixing matrix [tasks, tasks] in the suite's task order (row i: what task
    i's column takes from each column), None under other architectures."""
    stitches = getattr(model.trunk, "stitches", None)
    return None if stitches is None else stitches[-1].detach().double().cpu().numpy()


def write_stitch(matrix: np.ndarray, names: list[str], out_dir: str) -> list[str]:
    """`cross_stitch.csv` (row: source column, column: recipient task) and `cross_stitch.png`."""
    from distributed_mtml import relations

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("cross_stitch.csv", "cross_stitch.png")]
    with open(paths[0], "w") as f:
        f.write(relations.to_csv(matrix.T, names))
    relations.heatmap(matrix.T, names, "cross-stitch mix (source column -> recipient task)", paths[1])
    return paths


def gated(model: MultiTaskModel) -> bool:
    """Whether the model's tasks weigh shared experts (an architecture with gates)."""
    return any(hasattr(m.mix, "shared_weights") for m in model.task_modules.values())


def mean_weights(model: MultiTaskModel, suite_dir: str, split: str = "val") -> tuple[np.ndarray, list[str], list[str]]:
    """([tasks, columns] each task's weights averaged over its `split` rows, the task names, the
    column names), the split read in batches."""
    spec = load_suite_spec(suite_dir)
    tasks = [t for t in spec.tasks if t.name in model.task_modules]
    preps = {t.name: model.preprocessing.get(t.name) or TaskPrep() for t in tasks}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    with torch.no_grad():
        for name, (x, _) in tasks_split_batches(suite_dir, tasks, split, preps):
            module = model.task_modules[name]
            inputs = module.adapter(x)
            w = module.mix.shared_weights(inputs, model.trunk(inputs)).double().sum(0)
            sums[name] = sums[name] + w if name in sums else w
            rows[name] = rows.get(name, 0) + len(x)
    names = [t.name for t in tasks if t.name in sums]
    weights = np.stack([(sums[n] / rows[n]).numpy() for n in names])
    own = any(hasattr(m.mix, "own") for m in model.task_modules.values())
    return weights, names, column_names(weights.shape[1], own)


def column_names(width: int, own: bool) -> list[str]:
    """The names of a task's `width` gate columns: `expert 1`, ..., then `OWN` under cgc and ple."""
    return [f"expert {e + 1}" for e in range(width - int(own))] + ([OWN] if own else [])


def key_name(column: str) -> str:
    """A column as the last part of a metric key: `expert 1` -> `expert_1`, a source task's
    name without '/' (the per-task tables read a key's last part as its metric)."""
    return column.replace(" ", "_").replace("/", "_")


def epoch_metrics(trunk: torch.nn.Module, modules: torch.nn.ModuleDict, inputs: dict[str, torch.Tensor],
                  order: list[str]) -> dict[str, float]:
    """What the architecture learned so far, each epoch, for the tasks in `inputs` (their val
    features, on the worker that owns them): `gates/<task>/<column>`, its mean gate weights
    over those rows (gated kinds; columns as `mean_weights` names them), or
    `cross_stitch/<task>/from_<source>`, its row of the last mixing matrix (`order`: the
    suite's tasks, the matrix's columns). Per-task keys: with
    many tasks they go to the per-epoch tables (`per_task`)."""
    out: dict[str, float] = {}
    stitches = getattr(trunk, "stitches", None)
    with torch.no_grad():
        for name, x in inputs.items():
            mix = modules[name].mix
            if not len(x):
                continue
            if stitches is not None and getattr(mix, "index", None) is not None:
                row = stitches[-1][mix.index].double().cpu().tolist()
                out.update({f"cross_stitch/{name}/from_{key_name(source)}": v for source, v in zip(order, row)})
            elif hasattr(mix, "shared_weights"):
                adapted = modules[name].adapter(x)
                w = mix.shared_weights(adapted, trunk(adapted)).double().mean(0).cpu().tolist()
                names = column_names(len(w), hasattr(mix, "own"))
                out.update({f"gates/{name}/{key_name(c)}": v for c, v in zip(names, w)})
    return out


def similarity(weights: np.ndarray) -> np.ndarray:
    """[tasks, tasks]: the Bhattacharyya coefficient of every pair of tasks' mean weights."""
    root = np.sqrt(np.clip(weights, 0, None))
    return root @ root.T


def similarity_by_epoch(history: dict[str, dict[int, float]], names: list[str], columns: list[str]) -> list[str]:
    """The lines of `gate_similarity_by_epoch.csv` (epoch, task, other task, similarity; each
    pair once) from the logged `gates/<task>/<column>` histories (`history`: key -> step ->
    value); the epochs where a task's weights are missing are left out."""
    steps = sorted(set.intersection(*(set(h) for h in history.values()))) if history else []
    lines = ["epoch,task,other,similarity\n"]
    for step in steps:
        weights = np.array([[history[f"gates/{n}/{key_name(c)}"][step] for c in columns] for n in names])
        alike = similarity(weights)
        lines += [f"{step},{a},{b},{alike[i, j]:.6g}\n" for i, a in enumerate(names) for j, b in enumerate(names) if i < j]
    return lines


SIMILAR_UP_TO = 200  # tasks up to which the task x task similarity is written and drawn (10,000 tasks: 10^8 cells)
LABELLED_UP_TO = 50  # tasks up to which the figure names each task


def write(weights: np.ndarray, names: list[str], columns: list[str], out_dir: str) -> list[str]:
    """`gates.csv` (task x column), `gate_similarity.csv` (task x task, up to `SIMILAR_UP_TO`
    tasks) and `gates.png` (both, side by side) in `out_dir`; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    alike = similarity(weights) if len(names) <= SIMILAR_UP_TO else None
    tables = {"gates.csv": (columns, weights), "gate_similarity.csv": (names, alike)}
    paths = []
    for file, (header, values) in tables.items():
        if values is not None:
            paths.append(os.path.join(out_dir, file))
            with open(paths[-1], "w") as f:
                f.write("task," + ",".join(header) + "\n")
                f.writelines(f"{n}," + ",".join(f"{v:.6g}" for v in row) + "\n" for n, row in zip(names, values))
    paths.append(os.path.join(out_dir, "gates.png"))
    _figure(weights, alike, names, columns, paths[-1])
    return paths


def _figure(weights: np.ndarray, alike: np.ndarray | None, names: list[str], columns: list[str], path: str) -> None:
    """The weights (and the similarity), each on its own colour scale from its least value, so
    that gates which moved little from the experts' mean still show how they moved."""
    from distributed_mtml.report import pyplot

    plt = pyplot()
    panels = [(weights, columns, "mean gate weight")] + ([(alike, names, "gate similarity (Bhattacharyya)")]
                                                          if alike is not None else [])
    widths = [len(labels) for _, labels, _ in panels]
    height = min(0.35 * len(names), 20) + 2
    fig, axes = plt.subplots(1, len(panels), figsize=(min(0.35 * sum(widths), 24) + 3 * len(panels), height),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (values, xlabels, title) in zip(axes[0], panels):
        image = ax.imshow(values, cmap="viridis", vmin=float(np.min(values)), aspect="auto")
        ax.set_title(title)
        if len(names) <= LABELLED_UP_TO:
            ax.set(yticks=range(len(names)))
            ax.set_yticklabels(names)
        if len(xlabels) <= LABELLED_UP_TO:
            ax.set(xticks=range(len(xlabels)))
            ax.set_xticklabels(xlabels, rotation=45, ha="right")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def agreement(affinity: np.ndarray, affinity_order: list[str], alike: np.ndarray, names: list[str]) -> tuple[float, int]:
    """(Spearman's rank correlation between TAG's affinity of each pair of tasks and what the
    architecture learned of them (gate similarity, cross-stitch's mix), each with its two
    directions averaged; the pairs compared): whether the tasks the model put together are the
    ones that measurably help each other."""
    from scipy.stats import spearmanr

    at = {n: i for i, n in enumerate(names)}
    both = [n for n in affinity_order if n in at]
    row = {n: affinity_order.index(n) for n in both}
    pairs = [(a, b) for k, a in enumerate(both) for b in both[k + 1:]]
    measured = [(affinity[row[a], row[b]] + affinity[row[b], row[a]]) / 2 for a, b in pairs]
    learned = [(alike[at[a], at[b]] + alike[at[b], at[a]]) / 2 for a, b in pairs]
    if len(pairs) < 3:
        return float("nan"), len(pairs)
    return float(spearmanr(measured, learned).statistic), len(pairs)
