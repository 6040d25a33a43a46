"""The few-shot evaluation protocol of the MAML paper's sinusoid experiment.

Adapt the meta-learned model to each of `tasks` held-out tasks (600 in the paper) from K
support points, with the algorithm's own inner rule (its rates; ANIL: the head only), and
score the query set after 0, 1, ..., N steps. Report the mean over tasks and its 95% interval
(`stats.mean_ci`; with 600 tasks, the paper's 1.96 * std / sqrt(tasks) to 0.2%). Held-out tasks come from a fixed stream that training never draws
from: a family with its own seed, or the tasks of a suite given on the command line (every
row of a task may then serve as support or query).
"""

from __future__ import annotations

import os
import tempfile

import torch

from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_task
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.errors import InputError
from distributed_mtml.meta.algorithms import MetaLearner, adaptation_curve
from distributed_mtml.meta.plan import MetaPlan, enough_rows
from distributed_mtml.meta.tasks import FAMILIES, Episodes, SuiteEpisodes, episode_generator
from distributed_mtml.stats import mean_ci
from distributed_mtml.tracking import Tracker

EVAL_SEED = 1  # the original code evaluates with np.random.seed(1)


def held_out_episodes(plan: dict, suite_dir: str | None, shots: int, query: int, tasks: int) -> Episodes:
    """Episodes of the held-out tasks: from `suite_dir` if given, else from the run's family."""
    generator = episode_generator(EVAL_SEED, shots, query)
    if suite_dir is None:
        if plan["source"] != "family":
            raise InputError("--suite: this run meta-trained on a suite; name the suite of held-out tasks")
        return FAMILIES[plan["name"]](shots, query).sample(generator, tasks)
    meta = MetaPlan.model_validate(plan)
    spec = checked_suite(suite_dir, meta.config.data.impute == "mean")
    rows = {}
    for task in spec.tasks:
        split = meta.task_rows(load_task(suite_dir, task))  # the saved transform, or none (`by_support`)
        rows[task.name] = tuple(torch.cat([split[s][i] for s in SPLITS]) for i in (0, 1))
    kept = enough_rows({name: len(y) for name, (_, y) in rows.items()}, shots + query, suite_dir, "labelled rows",
                       f"--shots {shots} + {query} query points", "held-out tasks", "left out")
    rows = {name: rows[name] for name in kept}
    return SuiteEpisodes(rows, shots, query, meta.by_support()).sample(generator, tasks)


def few_shot_curve(learner: MetaLearner, episodes: Episodes, steps: int, chunk: int = 200) -> dict[str, list[tuple]]:
    """metric -> [(mean, ci95)] for 0..steps adaptation steps, over all episodes."""
    parts = [adaptation_curve(learner, part, steps) for part in episodes.chunk(chunk)]
    out = {}
    for metric in parts[0]:
        values = torch.cat([p[metric] for p in parts]).double()  # [tasks, steps + 1]
        out[metric] = [mean_ci(column) for column in values.T.numpy()]
    return out


def log_curve(tracker: Tracker, run_id: str, curve: dict[str, list[tuple]], shots: int) -> None:
    """Metrics `fewshot/<K>shot/<metric>` (step = adaptation steps), their `_ci95`, and a plot."""
    from distributed_mtml import report

    for metric, points in curve.items():
        for step, (mean, half) in enumerate(points):
            tracker.log_metrics(run_id, {f"fewshot/{shots}shot/{metric}": mean,
                                               f"fewshot/{shots}shot/{metric}_ci95": half}, step=step)
    with tempfile.TemporaryDirectory() as d:
        for metric, points in curve.items():
            if len(points) == 1:  # an anchor, not a curve
                continue
            path = os.path.join(d, f"fewshot_{shots}shot_{metric}.png")
            report.adaptation_plot([m for m, _ in points], [h for _, h in points],
                                   f"{shots}-shot query {metric}, {len(points) - 1} steps", f"query {metric}", path)
            tracker.client().log_artifact(run_id, path, "plots")
