"""Does transfer pay? Strategies against `scratch` on held-out targets, for K in {5, 10, 20, 50}.

Three sources and held-out targets:
  seed-example  source: `mtml train` on seed-example (seed 1); target: the regression task of a
                held-out variant (seed 1, variant 1: the same latent map, new readouts and rows)
  mmoe          source: `mtml train` on tasks 0-4 of a 6-task mmoe suite (correlation 0.9);
                target: task 5, never seen
  sinusoid      source: `mtml meta-train` (MAML) on the sinusoid family; target: tasks of a
                sinusoid suite made with another seed (each draw a different task)
For each target and K, every applicable strategy is searched over learning rates on the
validation split (mean over draws), then its best setting is scored on the test split over
`--draws` K-shot draws (mean +- 95% CI). The table marks the best strategy by validation and
whether it beats scratch on test. Strategies are the ones `mtml transfer` runs, in-process.

Usage: python jobs/bench_transfer.py [--draws 5] [--shots 5 10 20 50] [--meta-iterations 5000]
       [--targets seed-example mmoe sinusoid]
"""

from __future__ import annotations

import argparse
import os
import statistics

import benchlib

from distributed_mtml.config import validate_config
from distributed_mtml.data.generators import make_suite
from distributed_mtml.errors import InputError
from distributed_mtml.meta.launch import run_meta_training
from distributed_mtml.report import table
from distributed_mtml.stats import fmt
from distributed_mtml.transfer.fit import fit
from distributed_mtml.transfer.run import HEADLINE
from distributed_mtml.transfer.source import load_inputs
from distributed_mtml.transfer.strategies import STRATEGIES, build

LRS = [0.003, 0.01, 0.03]


def _sources(meta_iterations: int, targets: list[str]) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (source checkpoint, target suite dir, target tasks), for the chosen targets."""
    out = {}
    if "seed-example" in targets:
        out["seed-example"] = _seed_example()
    if "mmoe" in targets:
        out["mmoe"] = _mmoe()
    if "sinusoid" in targets:
        out["sinusoid"] = _sinusoid(meta_iterations)
    return out


TRAIN = {"epochs": 10, "lr": 0.003}


def _seed_example() -> tuple[str, str, list[str]]:
    w = benchlib.WORKDIR
    seed_src, seed_tgt = os.path.join(w, "seed-src"), os.path.join(w, "seed-tgt")
    make_suite("seed-example", seed_src, {"rows": 2000, "seed": 1})
    make_suite("seed-example", seed_tgt, {"rows": 600, "seed": 1, "variant": 1})
    run = benchlib.train(benchlib.config(suite={"path": seed_src}, training=TRAIN), "transfer-src-seed")
    return run.checkpoint_path, seed_tgt, ["regress"]


def _mmoe() -> tuple[str, str, list[str]]:
    mmoe = os.path.join(benchlib.WORKDIR, "mmoe6")
    make_suite("mmoe", mmoe, {"tasks": 6, "correlation": 0.9, "features": 16, "sines": 2, "rows": 1200, "seed": 0})
    source = benchlib.subset_suite(mmoe, [f"task{i}" for i in range(5)])
    run = benchlib.train(benchlib.config(suite={"path": source}, training=TRAIN), "transfer-src-mmoe")
    return run.checkpoint_path, mmoe, ["task5"]


def _sinusoid(meta_iterations: int) -> tuple[str, str, list[str]]:
    sines = os.path.join(benchlib.WORKDIR, "sine-tgt")
    make_suite("sinusoid", sines, {"tasks": 10, "rows": 100, "seed": 99})
    meta_cfg = benchlib.config(suite={"generator": "sinusoid"}, model={"trunk": {"widths": [40, 40]}},
                               meta={"iterations": meta_iterations, "report_every": meta_iterations, "shots": 10})
    benchlib.ensure_ray(None)
    run = run_meta_training(meta_cfg, "transfer-src-sinusoid", benchlib.TRACKER)
    return run.checkpoint_path, sines, [f"sine{i:03d}" for i in range(10)]


def _score(strategy: str, source: str, suite: str, tasks: list[str], shots: int, lr: float, split: str,
           draws: int) -> list[float]:
    scores = []
    for draw in range(draws):
        cfg = validate_config({"transfer": {"source": source, "target": {"path": suite},
                                            "target_task": tasks[draw % len(tasks)], "shots": shots,
                                            "seed": draw, "steps": 100, "eval_every": 100}})
        inputs = load_inputs(cfg, benchlib.TRACKER)
        metric, _ = HEADLINE[inputs.target.type]
        built = build(strategy, inputs, 1, 8, seed=draw)
        scores.append(fit(built, inputs, 100, lr, 100, test=split == "test")[-1][1][f"{split}/{metric}"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="*", default=[5, 10, 20, 50])
    parser.add_argument("--meta-iterations", type=int, default=5000)
    parser.add_argument("--targets", nargs="*", default=["seed-example", "mmoe", "sinusoid"],
                        choices=["seed-example", "mmoe", "sinusoid"])
    args = parser.parse_args()
    rows = []
    for name, (source, suite, tasks) in _sources(args.meta_iterations, args.targets).items():
        for shots in args.shots:
            results = {}
            for strategy in STRATEGIES:
                try:
                    val = {lr: statistics.mean(_score(strategy, source, suite, tasks, shots, lr, "val", args.draws))
                           for lr in ([None] if strategy == "meta_adapt" else LRS)}
                except InputError:
                    continue  # the strategy does not apply to this source (e.g. meta_adapt on a train run)
                best_lr = min(val, key=val.get)  # regression targets: lower mse is better
                test = _score(strategy, source, suite, tasks, shots, best_lr or 0.01, "test", args.draws)
                results[strategy] = (val[best_lr], test, best_lr)
            best = min((s for s in results if s != "scratch"), key=lambda s: results[s][0])
            wins = statistics.mean(results[best][1]) < statistics.mean(results["scratch"][1])
            rows.append([name, shots, fmt(results["scratch"][1], 3), best, fmt(results[best][1], 3),
                         "yes" if wins else "no"])
            print(f"[transfer] {name} K={shots}: " + ", ".join(
                f"{s} {statistics.mean(r[1]):.3f}" for s, r in results.items()), flush=True)
    print()
    print(table(["target", "K", "scratch test mse", "best by val", "its test mse", "beats scratch"], rows))


if __name__ == "__main__":
    main()
