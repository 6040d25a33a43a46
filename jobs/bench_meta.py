"""Speed of the batched meta-learning step against a per-task loop, side by side.

For every algorithm, at meta-batch 25 on the sinusoid network (1-40-40-1, K = 10 support and
10 query points, one inner step), one thread: meta-iterations per second of
  batched   all tasks adapted in one `torch.func.vmap` call (what `mtml meta-train` runs)
  loop      one task at a time, adapting with `torch.autograd.grad` (the learn2learn way)
each iteration being the meta-gradient plus an Adam step, and the largest difference between
the two implementations' query losses and meta-gradients on the same fixed-seed batch.
Target: batched at least 5x the loop.

Usage: python jobs/bench_meta.py [--iterations 200] [--repeats 3] [--meta-batch 25]
"""

from __future__ import annotations

import argparse
import time

import torch

from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.meta.algorithms import ALGORITHMS, META_TASK, MetaLearner, meta_gradient, meta_gradient_loop
from distributed_mtml.meta.tasks import SinusoidFamily, episode_generator
from distributed_mtml.models import MultiTaskModel, TaskShape
from distributed_mtml.report import table


def _learner(algorithm: str) -> MetaLearner:
    cfg = ModelConfig(trunk=TrunkConfig(widths=[40, 40]), heads="separate")  # a meta head is its own
    return MetaLearner(MultiTaskModel(cfg, [TaskShape(META_TASK, "regression", 1)], 0), algorithm, 0.01)


def _iterations_per_second(step, learner: MetaLearner, batch: int, iterations: int, repeats: int) -> float:
    family, optimizer = SinusoidFamily(10, 10), torch.optim.Adam(learner.parameters(), lr=1e-3)
    batches = [family.sample(episode_generator(0, 0, i), batch) for i in range(iterations)]
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        for episodes in batches:
            step(learner, episodes, 1, batch)
            optimizer.step()
        best = min(best, time.perf_counter() - begin)
    return iterations / best


def _max_difference(algorithm: str, batch: int) -> float:
    learner = _learner(algorithm)
    episodes = SinusoidFamily(10, 10).sample(episode_generator(0, 1, 0), batch)
    a = meta_gradient(learner, episodes, 1, batch)
    grads = [p.grad.clone() for p in learner.parameters()]
    b = meta_gradient_loop(learner, episodes, 1, batch)
    diffs = [(a - b).abs().max()] + [(g - p.grad).abs().max() for g, p in zip(grads, learner.parameters())]
    return float(max(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for algorithm in ALGORITHMS:
        batched = _iterations_per_second(meta_gradient, _learner(algorithm), args.meta_batch, args.iterations, args.repeats)
        loop = _iterations_per_second(meta_gradient_loop, _learner(algorithm), args.meta_batch,
                                      max(args.iterations // 5, 10), args.repeats)
        rows.append([algorithm, f"{batched:.0f}", f"{loop:.0f}", f"{batched / loop:.1f}",
                     f"{_max_difference(algorithm, args.meta_batch):.1e}"])
        print(f"[bench] {algorithm}: batched {batched:.0f} it/s, loop {loop:.0f} it/s", flush=True)
    print()
    print(table(["algorithm", "batched it/s", "loop it/s", "x loop", "max |difference|"], rows))


if __name__ == "__main__":
    main()
