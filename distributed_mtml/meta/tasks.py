"""Episodes for meta-learning: per task, K support points to adapt on and Q query points to
score the adapted model, stacked over tasks so that one batched call adapts them all.

Two sources share one interface, `sample(generator, n) -> Episodes`:
- a procedural family sampled on the fly (the MAML sinusoid), an endless task distribution;
- the tasks of a Parquet suite, each episode drawn without replacement from one task's rows.
Every draw comes from an explicit `torch.Generator`: in training, episode j of iteration i from
(seed, j, i), so runs repeat, a resumed run sees what it would have seen, and the worker count
does not change the meta-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distributed_mtml.data.prepare import TaskPrep


@dataclass
class Episodes:
    xs: torch.Tensor  # [B, K, d] support inputs
    ys: torch.Tensor  # [B, K] support targets (float for regression, long for classes)
    xq: torch.Tensor  # [B, Q, d] query inputs
    yq: torch.Tensor  # [B, Q]

    def __len__(self) -> int:
        return len(self.xs)

    def to(self, device: torch.device) -> "Episodes":
        return Episodes(*(t.to(device) for t in (self.xs, self.ys, self.xq, self.yq)))

    @staticmethod
    def cat(parts: list["Episodes"]) -> "Episodes":
        return Episodes(*(torch.cat(ts) for ts in zip(*((p.xs, p.ys, p.xq, p.yq) for p in parts))))

    def chunk(self, size: int) -> list["Episodes"]:
        parts = zip(*(t.split(size) for t in (self.xs, self.ys, self.xq, self.yq)))
        return [Episodes(*p) for p in parts]


def episode_generator(seed: int, *stream: int) -> torch.Generator:
    """A generator for one stream of draws, e.g. (seed, rank, iteration)."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class SinusoidFamily:
    """The MAML sinusoid family: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
    x ~ U[-5, 5] (the original code's ranges and sign convention)."""

    num_features = 1
    columns = ["x0"]  # as `mtml data make sinusoid` names it, so its tables adapt the model

    def __init__(self, shots: int, query: int):
        self.shots, self.query = shots, query

    def sample(self, generator: torch.Generator, n: int) -> Episodes:
        amp = 0.1 + 4.9 * torch.rand(n, 1, generator=generator)
        phase = math.pi * torch.rand(n, 1, generator=generator)
        x = -5.0 + 10.0 * torch.rand(n, self.shots + self.query, generator=generator)
        y = amp * torch.sin(x - phase)
        k = self.shots
        return Episodes(x[:, :k, None], y[:, :k], x[:, k:, None], y[:, k:])

    def episode(self, task: str | None, generator: torch.Generator) -> Episodes:
        """One episode (the family has no named tasks)."""
        return self.sample(generator, 1)


FAMILIES = {"sinusoid": SinusoidFamily}


class SuiteEpisodes:
    """Episodes from a fixed set of tasks, each given as (x [N, d], y [N]) rows. `by_support`:
    each episode's rows are standardised by its support rows' statistics alone (`support_prep`),
    the only labels of a new task there are to standardise by."""

    def __init__(self, tasks: dict[str, tuple[torch.Tensor, torch.Tensor]], shots: int, query: int,
                 by_support: bool = False):
        self.names = list(tasks)
        self.rows = [tasks[n] for n in self.names]
        self.shots, self.query, self.by_support = shots, query, by_support

    def sample(self, generator: torch.Generator, n: int) -> Episodes:
        picks = torch.randint(len(self.rows), (n,), generator=generator).tolist()
        parts = []
        for i in picks:  # sampling only; the adaptation itself is batched
            x, y = self.rows[i]
            rows = torch.randperm(len(y), generator=generator)[: self.shots + self.query]
            parts.append((x[rows], y[rows]))
        return self._episodes(parts)

    def episode(self, task: str, generator: torch.Generator) -> Episodes:
        """One episode of the named task."""
        x, y = self.rows[self.names.index(task)]
        rows = torch.randperm(len(y), generator=generator)[: self.shots + self.query]
        return self._episodes([(x[rows], y[rows])])

    def _episodes(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Episodes:
        if self.by_support:
            parts = [_standardised(x, y, self.shots) for x, y in parts]
        x = torch.stack([p[0] for p in parts])
        y = torch.stack([p[1] for p in parts])
        k = self.shots
        return Episodes(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def support_prep(xs: np.ndarray, ys: np.ndarray) -> TaskPrep:
    """How a task known by its K labelled rows is standardised, in meta-training, few-shot
    evaluation and `mtml predict --adapt-from` alike: by those rows' statistics only."""
    return TaskPrep.of_rows(xs, ys if ys.dtype.kind == "f" else None)


def _standardised(x: torch.Tensor, y: torch.Tensor, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's rows (support first) transformed by `support_prep` of its support rows."""
    prep = support_prep(x[:shots].numpy(), y[:shots].numpy())
    return torch.from_numpy(prep.inputs(x.numpy())), torch.as_tensor(np.asarray(prep.scaled_target(y.numpy())))


def draw(source, seed: int, stream: int, items: list[tuple[int, str | None]]) -> Episodes | None:
    """The episodes `items` = [(index, task)] of one meta-batch (`stream`: its iteration, or the
    validation set's), episode j from its own generator (seed, j, stream): which worker draws
    it, and how many workers there are, does not change it. None for no items."""
    parts = [source.episode(task, episode_generator(seed, j, stream)) for j, task in items]
    return Episodes.cat(parts) if parts else None
