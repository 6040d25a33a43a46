"""Sinusoid few-shot quality of every meta-learning algorithm, in the MAML paper's protocol.

For each algorithm and each K, meta-trains on the sinusoid family with K support and K query
points per task through `mtml meta-train` (the config `jobs/configs/sinusoid_maml.yaml`, with
the algorithm, K and iterations set here), then adapts to 600 held-out tasks from K points and
prints the query MSE after 1 and 10 steps, mean +- 95% CI, beside the published numbers
(Meta-SGD paper, Table 1; its 10- and 20-shot rows are as recalled in our research notes).

Usage: python jobs/meta_quality.py [--iterations 70000] [--shots 5 10 20] [--algorithms maml metasgd]
       [--workers 2] [--set meta.inner_steps=5 ...]
"""

from __future__ import annotations

import argparse
import os

import benchlib

from distributed_mtml.config import load_config
from distributed_mtml.meta.algorithms import ALGORITHMS
from distributed_mtml.meta.checkpoint import load_learner
from distributed_mtml.meta.evaluate import few_shot_curve, held_out_episodes
from distributed_mtml.meta.launch import run_meta_training
from distributed_mtml.report import table

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sinusoid_maml.yaml")
PUBLISHED = {("maml", 5): "1.13 +- 0.18", ("metasgd", 5): "0.90 +- 0.16", ("maml", 10): "0.85 +- 0.14",
             ("metasgd", 10): "0.53 +- 0.09", ("maml", 20): "0.71 +- 0.12", ("metasgd", 20): "0.31 +- 0.05"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=70000)
    parser.add_argument("--shots", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = parser.parse_args()
    rows = []
    for algorithm in args.algorithms:
        for shots in args.shots:
            overrides = [f"meta.algorithm={algorithm}", f"meta.shots={shots}", f"meta.iterations={args.iterations}",
                         f"meta.report_every={max(args.iterations // 5, 1)}", f"scaling.num_workers={args.workers}",
                         f"checkpoint.dir={benchlib.WORKDIR}/runs", "tracking.experiment=meta-quality", *args.set]
            out = run_meta_training(load_config(CONFIG, overrides), f"quality-{algorithm}-{shots}", benchlib.TRACKER)
            learner, plan = load_learner(out.checkpoint_path)
            curve = few_shot_curve(learner, held_out_episodes(plan, None, shots, shots, 600), 10)["loss"]
            fmt = [f"{m:.3f} +- {h:.3f}" for m, h in curve]
            rows.append([algorithm, shots, fmt[0], fmt[1], fmt[10], PUBLISHED.get((algorithm, shots), "")])
            print(f"[quality] {algorithm} {shots}-shot: 1 step {fmt[1]}, 10 steps {fmt[10]}", flush=True)
    print(f"\n{args.iterations} meta-iterations, overrides {args.set or 'none'}; query MSE on 600 held-out tasks")
    print(table(["algorithm", "K", "0 steps", "1 step", "10 steps", "published, 1 step"], rows))


if __name__ == "__main__":
    main()
