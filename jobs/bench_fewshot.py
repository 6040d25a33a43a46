"""A new group from K labelled rows: does meta-learned adaptation beat what a statistician predicts?

    pip install -e '.[bench]'   # scikit-learn and statsmodels, the anchors
    python jobs/bench_fewshot.py [--seeds 2] [--settings strong,weak] [--shots 3,5,10,20] [--algorithms maml,ridge_head]
                                 [--set KEY=VALUE]

Each setting is a `multilevel` suite (`mtml data make multilevel`, 80 groups of 60 rows, 42 of them
train so that K = 20 support and 10 query rows fit: random intercepts and slopes on x1,
group-level covariates z). The first 60 groups are the training
suite, the last 20 the new groups. For each K, `mtml meta-train` (local mode, the default
algorithm, `meta.shots` K) learns on the training groups' train rows; then every method sees the
same episodes of the new groups: K support rows with their labels, 10 query rows to predict
(600 episodes, the episode stream of `mtml evaluate`). Query MSE in the target's units, mean over
episodes and seeds, +- the 95% CI over episodes of the first seed, and the ratio to the BLUP:
  <algorithm>, N steps  `mtml meta-train` with that `meta.algorithm`, adapted with its own inner rule
                      on the K rows, exactly as `mtml predict --adapt-from` does (the model's saved
                      transform); ridge_head's one closed-form solve is its every step count
  <algorithm>, 0 steps  the same model unadapted (a 0-shot prediction)
  <algorithm>, validated steps  with the step count 0..10 that did best on its validation tasks
                      (saved with the model: `mtml predict --adapt-from`'s default)
  <algorithm> + shift   its 0 steps + the K rows' mean residual
  multi-task + offsets  `mtml train` (the defaults: `shared_plus_offset` heads over a passthrough
                      trunk, `head_penalty: em`; bench_multilevel's config) on the training groups,
                      then `mtml predict --adapt-from` the K rows: the shared head plus offsets
                      solved in closed form with the learned variances (a BLUP of its own)
  multi-task, 0-shot  the same model's shared head alone
  multi-task plain + offsets  the same with the defaults before d7dfbfb (a plain trunk, `auto` penalty)
  pooled ridge        RidgeCV on every training group's train rows (0-shot)
  mixedlm BLUP        statsmodels MixedLM y ~ x + z, random intercept and slope on x1, fitted on
                      the training groups' train rows; a new group's prediction = fixed part +
                      its BLUP from the K rows: b = G Z' (Z G Z' + s2 I)^-1 (y - X beta)
Target: ours within 2% of the BLUP or better at every K, better than 0 steps at every K.
"""

from __future__ import annotations

import argparse
import os
import warnings

import benchlib
import numpy as np
import pandas as pd
import torch
import yaml

from distributed_mtml.config import apply_overrides
from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.meta.evaluate import EVAL_SEED
from distributed_mtml.meta.launch import run_meta_training
from distributed_mtml.meta.tasks import episode_generator
from distributed_mtml.predict import NEW_GROUP, Predictor
from distributed_mtml.report import table
from distributed_mtml.runtime.cluster import ensure_ray
from distributed_mtml.stats import mean_ci

SETTINGS = {"strong": {"groups": 80, "rows": 60, "between": 0.6}, "weak": {"groups": 80, "rows": 60, "between": 0.1}}
TRAIN_GROUPS, QUERY, EPISODES, STEPS = 60, 10, 600, 10
META = {"iterations": 1500, "report_every": 500, "val_tasks": 60}


def _suites(setting: str, seed: int) -> tuple[str, str]:
    """(training suite, new groups' suite) of one generated suite, pointing at its files."""
    root = os.path.join(benchlib.WORKDIR, f"fewshot-{setting}-{seed}")
    make_suite("multilevel", os.path.join(root, "all"), {**SETTINGS[setting], "seed": seed})
    spec = yaml.safe_load(open(os.path.join(root, "all", "suite.yaml")))
    out = []
    for name, tasks in (("train", spec["tasks"][:TRAIN_GROUPS]), ("new", spec["tasks"][TRAIN_GROUPS:])):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        moved = [{**t, "path": os.path.join(root, "all", t["path"])} for t in tasks]
        with open(os.path.join(root, name, "suite.yaml"), "w") as f:
            yaml.safe_dump({**spec, "name": f"{spec['name']}-{name}", "tasks": moved}, f)
        out.append(os.path.join(root, name))
    return out[0], out[1]


def _frame(suite: str, splits: tuple[str, ...]) -> pd.DataFrame:
    """Every task's rows of `splits` in raw units, with its group."""
    parts = []
    for j, task in enumerate(load_suite_spec(suite).tasks):
        data = load_task(suite, task)
        for s in splits:
            parts.append(pd.DataFrame(data.x[s].astype(np.float64), columns=data.features).assign(
                y=data.y[s].astype(np.float64), group=j))
    return pd.concat(parts, ignore_index=True)


def _episodes(new: pd.DataFrame, shots: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(support, query) rows of EPISODES episodes of the new groups, every row of a group eligible."""
    g = episode_generator(EVAL_SEED, shots, QUERY)
    groups = [part for _, part in new.groupby("group")]
    out = []
    for _ in range(EPISODES):
        rows = groups[int(torch.randint(len(groups), (1,), generator=g))]
        pick = torch.randperm(len(rows), generator=g)[: shots + QUERY].numpy()
        out.append((rows.iloc[pick[:shots]], rows.iloc[pick[shots:]]))
    return out


class Blup:
    """MixedLM fitted on the training groups; a new group's prediction from its K rows."""

    def __init__(self, train: pd.DataFrame, features: list[str]):
        import statsmodels.formula.api as smf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = smf.mixedlm(f"y ~ {' + '.join(features)}", train, groups=train["group"], re_formula="~x1").fit(
                method="lbfgs")
        self.features, self.beta = features, fit.fe_params.to_numpy()
        self.cov, self.scale = np.asarray(fit.cov_re), float(fit.scale)

    def _fixed(self, rows: pd.DataFrame) -> np.ndarray:
        return self.beta[0] + rows[self.features].to_numpy() @ self.beta[1:]

    def predict(self, support: pd.DataFrame, query: pd.DataFrame) -> np.ndarray:
        z = lambda rows: np.column_stack([np.ones(len(rows)), rows["x1"].to_numpy()])  # noqa: E731
        zs = z(support)
        b = self.cov @ zs.T @ np.linalg.solve(zs @ self.cov @ zs.T + self.scale * np.eye(len(zs)),
                                              support["y"].to_numpy() - self._fixed(support))
        return self._fixed(query) + z(query) @ b


def _meta_model(suite: str, algorithm: str, shots: int, seed: int, overrides: list[str]) -> str:
    """A meta-trained model's directory (its kept checkpoint)."""
    raw = {"suite": {"path": suite}, "meta": {**META, "algorithm": algorithm, "shots": shots, "query": QUERY},
           "training": {"seed": seed}, "scaling": {"num_workers": 0}}
    cfg = benchlib.config(**apply_overrides(raw, overrides))
    ensure_ray(None)
    outcome = run_meta_training(cfg, f"fewshot-{algorithm}-{shots}", benchlib.TRACKER)
    return outcome.checkpoint_path


MULTITASK = {"multi-task": {}, "multi-task plain": {"trunk": {"passthrough": False}, "head_penalty": "auto"}}


def _multitask_model(suite: str, seed: int, model: dict) -> str:
    from bench_multilevel import TRAINING

    cfg = benchlib.config(suite={"path": suite}, training={**TRAINING, "seed": seed}, scaling={"num_workers": 0},
                          model=model)
    return benchlib.train(cfg, "fewshot-multitask").checkpoint_path


def _errors(models: dict[str, str], multitask: dict[str, str], blup: Blup, ridge, episodes,
            features: list[str]) -> dict[str, np.ndarray]:
    """Per-episode query MSE of every method, raw units."""
    predictors = {name: Predictor(m) for name, m in models.items()}
    grouped = {name: Predictor(m) for name, m in multitask.items()}
    out: dict[str, list[float]] = {}
    for support, query in episodes:
        methods = {}
        for name, predictor in grouped.items():
            predictor.adapt(support, "y", 0)
            methods[f"{name}, 0-shot"] = predictor.predict(query)[NEW_GROUP].to_numpy()
            predictor.adapt(support, "y", 1)
            methods[f"{name} + offsets"] = predictor.predict(query)[NEW_GROUP].to_numpy()
        y = query["y"].to_numpy()
        for name, predictor in predictors.items():
            predictor.adapt(support, "y", 0)
            zero = predictor.predict(query)["meta"].to_numpy()
            shift = (support["y"].to_numpy() - predictor.predict(support)["meta"].to_numpy()).mean()
            predictor.adapt(support, "y", STEPS)
            methods.update({f"{name}, {STEPS} steps": predictor.predict(query)["meta"].to_numpy(),
                            f"{name}, 0 steps": zero, f"{name} + shift": zero + shift})
            predictor.adapt(support, "y", predictor.adapt_steps)  # what `predict --adapt-from` takes by default
            methods[f"{name}, validated steps"] = predictor.predict(query)["meta"].to_numpy()
        methods.update({"pooled ridge": ridge.predict(query[features].to_numpy()),
                        "mixedlm BLUP": blup.predict(support, query)})
        for name, pred in methods.items():
            out.setdefault(name, []).append(float(np.mean((pred - y) ** 2)))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    from sklearn.linear_model import RidgeCV

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shots", default="3,5,10,20")
    parser.add_argument("--algorithms", default="maml,ridge_head", help="meta.algorithm of each meta-trained model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every meta-training run (e.g. meta.algorithm=anil)")
    args = parser.parse_args()
    for setting in args.settings.split(","):
        lines, multitask = [], {}
        for shots in map(int, args.shots.split(",")):
            per_seed = []
            for seed in range(args.seeds):
                train_suite, new_suite = _suites(setting, seed)
                train = _frame(train_suite, ("train",))
                features = [c for c in train.columns if c not in ("y", "group")]
                ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(train[features].to_numpy(), train["y"].to_numpy())
                episodes = _episodes(_frame(new_suite, SPLITS), shots)
                models = {a: _meta_model(train_suite, a, shots, seed, args.set) for a in args.algorithms.split(",")}
                if seed not in multitask:
                    multitask[seed] = {name: _multitask_model(train_suite, seed, m) for name, m in MULTITASK.items()}
                per_seed.append(_errors(models, multitask[seed], Blup(train, features), ridge, episodes, features))
            blup = np.mean([e["mixedlm BLUP"].mean() for e in per_seed])
            for name in per_seed[0]:
                mean = np.mean([e[name].mean() for e in per_seed])
                lines.append([shots, name, f"{mean:.3f} +- {mean_ci(per_seed[0][name])[1]:.3f}", f"{mean / blup:.3f}"])
            print(f"\n{setting}: {SETTINGS[setting]}, {args.seeds} seed(s), {EPISODES} episodes of {QUERY} query rows"
                  + (f", meta-training with {' '.join(args.set)}" if args.set else ""))  # after each K: nothing lost
            print(table(["K", "method", "query MSE (+- 95% CI, seed 0)", "/ BLUP"], lines), flush=True)


if __name__ == "__main__":
    main()
