"""Many small related tasks: does `mtml train` share across groups as well as a statistician?

    pip install -e '.[bench]'   # scikit-learn and statsmodels, the anchors
    python jobs/bench_multilevel.py [--seeds 2] [--first-seed 0] [--settings few-large,many-tiny,strong,weak] [--ours default,...]
                                    [--set KEY=VALUE]

Each setting is a `multilevel` suite (one regression task per group: random intercepts and slopes
on x1, group-level covariates z constant within a group; `mtml data make multilevel`). On the same
train/val/test rows of every group, side by side, pooled over every test row (MSE in the target's
units, mean +- 95% CI over seeds):
  mtml <name>                  `mtml train` in local mode with one plain config (trunk [100, 50],
                               lr 0.003, batch 32, up to 300 epochs, early stopping on val loss
                               with patience 30), the defaults or what `OURS` changes of them
  ridge per group              scikit-learn RidgeCV on each group's train rows (no pooling)
  pooled ridge                 one RidgeCV on every group's train rows (complete pooling)
  pooled ridge + one-hot       the same with a one-hot group column
  hist gradient boosting       HistGradientBoostingRegressor, the group id as a categorical feature
  mixedlm                      statsmodels MixedLM y ~ x + z, random intercept and slope on x1, groups
                               = task; prediction = fixed part + the group's BLUP (partial pooling)
Also printed: each mtml run's pooled *val* MSE (what a default may be chosen by; test is reported).
Nothing is tuned per setting: every setting runs the same configs.
"""

from __future__ import annotations

import argparse
import os
import warnings

import benchlib
import numpy as np

from distributed_mtml.config import apply_overrides
from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.report import table
from distributed_mtml.stats import fmt

SETTINGS = {  # name -> multilevel options
    "few-large": {"groups": 8, "rows": 200, "between": 0.3},
    "many-tiny": {"groups": 120, "rows": 15, "between": 0.3},
    "strong": {"groups": 40, "rows": 30, "between": 0.6},
    "weak": {"groups": 40, "rows": 30, "between": 0.1},
}
OURS = {  # name -> what it changes of the defaults
    "default": {},
    "before sharing": {"model": {"heads": "separate", "trunk": {"passthrough": False}}, "data": {"standardize": "task"}},
    # the default before the last layer was solved as a mixed model (d7dfbfb)
    "auto penalty on a plain trunk": {"model": {"trunk": {"passthrough": False}, "head_penalty": "auto"}},
    "task_embedding": {"model": {"heads": "task_embedding"}},
    "default with task statistics": {"data": {"standardize": "task"}},
}
TRAINING = {"epochs": 300, "batch_size": 32, "lr": 0.003, "early_stopping_patience": 30}


def _rows(suite: str) -> dict[str, dict]:
    """split -> {x, y, group}: every group's rows in raw units, stacked."""
    out = {s: {"x": [], "y": [], "group": []} for s in ("train", "val", "test")}
    features = None
    for j, task in enumerate(load_suite_spec(suite).tasks):
        data = load_task(suite, task)
        features = data.features
        for s, part in out.items():
            part["x"].append(data.x[s].astype(np.float64))
            part["y"].append(data.y[s].astype(np.float64))
            part["group"].append(np.full(len(data.y[s]), j))
    stacked = {s: {k: np.concatenate(v) for k, v in part.items()} for s, part in out.items()}
    return {**stacked, "features": features}


def _mse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((pred - y) ** 2))


def _one_hot(group: np.ndarray, groups: int) -> np.ndarray:
    return np.eye(groups)[group]


def anchors(rows: dict) -> dict[str, float]:
    """Test MSE of each practitioner's model, fitted on the train rows (val unused: they tune
    themselves by cross-validation or by likelihood)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV

    train, test = rows["train"], rows["test"]
    groups = int(max(train["group"].max(), test["group"].max())) + 1
    alphas = np.logspace(-3, 3, 13)
    per_group = np.empty_like(test["y"])
    for g in range(groups):
        fit = RidgeCV(alphas=alphas).fit(train["x"][train["group"] == g], train["y"][train["group"] == g])
        per_group[test["group"] == g] = fit.predict(test["x"][test["group"] == g])
    pooled = RidgeCV(alphas=alphas).fit(train["x"], train["y"]).predict(test["x"])
    with_id = lambda part: np.hstack([part["x"], _one_hot(part["group"], groups)])  # noqa: E731
    one_hot = RidgeCV(alphas=alphas).fit(with_id(train), train["y"]).predict(with_id(test))
    as_category = lambda part: np.hstack([part["x"], part["group"][:, None]])  # noqa: E731
    hgb = HistGradientBoostingRegressor(categorical_features=[train["x"].shape[1]], random_state=0)
    boosted = hgb.fit(as_category(train), train["y"]).predict(as_category(test))
    return {"ridge per group": _mse(per_group, test["y"]), "pooled ridge": _mse(pooled, test["y"]),
            "pooled ridge + one-hot": _mse(one_hot, test["y"]), "hist gradient boosting": _mse(boosted, test["y"]),
            "mixedlm": _mse(mixedlm_predictions(rows), test["y"])}


def mixedlm_predictions(rows: dict) -> np.ndarray:
    """statsmodels MixedLM, random intercept and slope on x1 per group; test predictions are the
    fixed part plus the group's BLUPs."""
    import pandas as pd
    import statsmodels.formula.api as smf

    names = rows["features"]
    frame = lambda part: pd.DataFrame(part["x"], columns=names).assign(y=part["y"], group=part["group"])  # noqa: E731
    train, test = frame(rows["train"]), frame(rows["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm(f"y ~ {' + '.join(names)}", train, groups=train["group"], re_formula="~x1").fit(method="lbfgs")
    effects = pd.DataFrame(fit.random_effects).T  # group -> [intercept, x1]
    blup = effects.reindex(test["group"]).fillna(0.0).to_numpy()
    return np.asarray(fit.predict(test)) + blup[:, 0] + blup[:, 1] * test["x1"].to_numpy()


def ours(suite: str, name: str, seed: int, rows: dict, overrides: list[str]) -> tuple[float, float]:
    """(pooled val MSE of the kept model, pooled test MSE) of one `mtml train` run."""
    raw = {"suite": {"path": suite}, "training": {**TRAINING, "seed": seed}, "scaling": {"num_workers": 0},
           "tracking": {"task_metrics_limit": 1000}}  # every group's MSE in the run, which pooling reads
    for section, values in OURS[name].items():
        raw[section] = {**raw.get(section, {}), **values}
    cfg = benchlib.config(**apply_overrides(raw, overrides))
    outcome = benchlib.train(cfg, f"multilevel-{name.replace(' ', '-').replace(',', '')}")
    names = [t.name for t in load_suite_spec(suite).tasks]
    pooled = {}
    for split, metrics in (("val", outcome.kept), ("test", outcome.metrics)):
        counts = np.bincount(rows[split]["group"], minlength=len(names))
        pooled[split] = sum(metrics[f"{split}/{n}/mse"] * counts[j] for j, n in enumerate(names)) / counts.sum()
    return pooled["val"], pooled["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every mtml run (e.g. training.lr=0.001)")
    parser.add_argument("--ours", default=",".join(OURS), help=f"the mtml runs, comma-separated, of: {', '.join(OURS)}")
    args = parser.parse_args()
    runs = args.ours.split(",")
    if unknown := set(runs) - set(OURS):
        parser.error(f"unknown --ours {', '.join(sorted(unknown))} (choose from: {', '.join(OURS)})")
    for setting in args.settings.split(","):
        results: dict[str, list[float]] = {}
        val: dict[str, list[float]] = {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            suite = os.path.join(benchlib.WORKDIR, f"multilevel-{setting}-{seed}")
            make_suite("multilevel", suite, {**SETTINGS[setting], "seed": seed})
            rows = _rows(suite)
            for name, value in anchors(rows).items():
                results.setdefault(name, []).append(value)
            for run in runs:
                v, t = ours(suite, run, seed, rows, args.set)
                val.setdefault(f"mtml {run}", []).append(v)
                results.setdefault(f"mtml {run}", []).append(t)
        mixed = np.mean(results["mixedlm"])
        lines = [[name, fmt(values, 3), f"{np.mean(values) / mixed:.3f}", fmt(val[name], 3) if name in val else ""]
                 for name, values in results.items()]
        print(f"\n{setting}: {SETTINGS[setting]}, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}{', mtml with ' + ' '.join(args.set) if args.set else ''}")
        print(table(["model", "test MSE", "/ mixedlm", "val MSE"], lines), flush=True)


if __name__ == "__main__":
    main()
