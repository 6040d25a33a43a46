"""Trunk-gradient aggregation methods, in three kinds.

- "gram": a pure function of the K x K Gram matrix G = [g_i . g_j] of the task gradients
  (and a seed, for methods with a random order) to K weights w; the update is sum_i w_i g_i.
- "coordinate": a function of the full [K, P] task gradients (GradDrop), for rules that
  look at every coordinate and so cannot be written with G alone.
- "loss": a per-task multiplier on the losses before an ordinary DDP backward (UW, DWA, RLW,
  GLS, STCH, FAMO). Those that need every task's loss at each step (`step_losses`) get it by one
  all-reduce of K floats; none needs a task gradient.

Capability flags on each entry say what a method needs beyond its kind: `state` (kept across
steps and saved with the checkpoint: DWA's loss history, FAMO's logits, STCH's nadir point, RLW's
step count, UW's learned log-variances, GradVac's target cosines, GradNorm's weights, DB-MTL's
gradient sizes), `step_losses`, `shared_layer` (each task's gradient norm at the trunk's last
weight matrix, one autograd.grad per owned task: GradNorm, DB-MTL), and `mean_scale` (False where identical
task gradients do not give their mean: the method's own step size).

Methods never touch `.grad` or `torch.distributed`: the exchange lives in `exchange.py`.
All follow the mean convention: with no conflict each task weighs 1/K, the DDP average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from distributed_mtml.aggregation import (
    aligned_mtl,
    cagrad,
    conflict_free,
    dualproj,
    fairgrad,
    graddrop,
    gradvac,
    imtl,
    mean,
    mgda,
    nash_mtl,
    pcgrad,
    upgrad,
)
from distributed_mtml.aggregation.db_mtl import DualBalancing
from distributed_mtml.aggregation.famo import FastAdaptiveWeighting
from distributed_mtml.aggregation.gls import GeometricLossStrategy
from distributed_mtml.aggregation.gradnorm import GradNorm
from distributed_mtml.aggregation.loss_weighting import (
    DynamicWeightAverage,
    Gather,
    LossWeighting,
    UncertaintyWeighting,
)
from distributed_mtml.aggregation.rlw import RandomLossWeighting
from distributed_mtml.aggregation.shared_layer import LastLayer
from distributed_mtml.aggregation.stch import SmoothTchebycheff


@dataclass(frozen=True)
class Method:
    summary: str
    kind: Literal["gram", "coordinate", "loss"] = "gram"
    weights: Callable[..., torch.Tensor] | None = None  # gram: (G [K, K] float64, *, seed, **params) -> [K]
    aggregate: Callable[..., tuple] | None = None  # coordinate: ([K, P], *, seed, **params) -> ([P], [K])
    loss_weighting: type[LossWeighting] | None = None  # loss: built per worker as cls(owned, order, **params)
    params: tuple[str, ...] = ()  # keys of the `aggregation` config section it takes
    needs_exchange: bool = True  # False: DDP's own gradient average carries the method
    mean_scale: bool = True  # identical task gradients give their mean (False: the method's own step size)
    state: bool = False  # keeps state across steps, saved with the checkpoint
    step_losses: bool = False  # needs every task's loss at each step (one all-reduce of K floats)
    shared_layer: bool = False  # needs each task's gradient norm at the trunk's last weight matrix


METHODS: dict[str, Method] = {
    "mean": Method("equal weights: plain DDP averaging", weights=mean.weights, needs_exchange=False),
    "pcgrad": Method("PCGrad: project away conflicting components (Yu et al. 2020)", weights=pcgrad.weights),
    "cagrad": Method(
        "CAGrad: best worst-case improvement near the mean (Liu et al. 2021)", weights=cagrad.weights, params=("c",)
    ),
    "mgda": Method("MGDA: min-norm point of the convex hull (Desideri 2012; Sener & Koltun 2018)", weights=mgda.weights),
    "upgrad": Method("UPGrad: mean of projections onto the dual cone (Quinton & Rey 2024)", weights=upgrad.weights,
                     params=("reg_eps",)),
    "dualproj": Method("DualProj: the mean projected onto the dual cone (Lopez-Paz & Ranzato 2017)",
                       weights=dualproj.weights, params=("reg_eps",)),
    "aligned_mtl": Method("Aligned-MTL: gradients made orthogonal and equal in size (Senushkin et al. 2023)",
                          weights=aligned_mtl.weights, params=("scale_mode",)),
    "nash_mtl": Method("Nash-MTL: the tasks' Nash bargaining solution (Navon et al. 2022)", weights=nash_mtl.weights,
                       params=("max_norm",), mean_scale=False),
    "fairgrad": Method("FairGrad: alpha-fair shares of the improvement (Ban & Ji 2024)", weights=fairgrad.weights,
                       params=("fairgrad_alpha",), mean_scale=False),
    "config": Method("ConFIG: the direction at equal angles to every task (Liu et al. 2025)",
                     weights=conflict_free.weights),
    "gradvac": Method("GradVac: cosines raised to learned per-pair targets (Wang et al. 2021)", weights=gradvac.weights,
                      loss_weighting=gradvac.Targets, params=("gradvac_beta",), state=True),
    "imtl": Method("IMTL-G: equal projection onto every task direction (Liu et al. 2021)", weights=imtl.weights),
    "graddrop": Method(
        "GradDrop: per coordinate keep one randomly drawn sign (Chen et al. 2020)",
        kind="coordinate", aggregate=graddrop.aggregate, params=("leak",),
    ),
    "uw": Method(
        "uncertainty weighting: learned per-task log-variance (Kendall et al. 2018)",
        kind="loss", loss_weighting=UncertaintyWeighting, needs_exchange=False, state=True,
    ),
    "dwa": Method(
        "dynamic weight average: weight by the epoch-to-epoch loss ratio (Liu et al. 2019)",
        kind="loss", loss_weighting=DynamicWeightAverage, params=("temperature",), needs_exchange=False, state=True,
    ),
    "rlw": Method(
        "random loss weighting: a fresh softmax-normal draw each step (Lin et al. 2022)",
        kind="loss", loss_weighting=RandomLossWeighting, needs_exchange=False, state=True,
    ),
    "gls": Method(
        "geometric loss strategy: the geometric mean of the losses (Chennupati et al. 2019)",
        kind="loss", loss_weighting=GeometricLossStrategy, needs_exchange=False, step_losses=True,
    ),
    "stch": Method(
        "smooth Tchebycheff: a smooth maximum of nadir-normalised log losses (Lin et al. 2024)",
        kind="loss", loss_weighting=SmoothTchebycheff, params=("stch_mu", "stch_warmup"), needs_exchange=False,
        state=True, step_losses=True, mean_scale=False,
    ),
    "famo": Method(
        "FAMO: weights learned from each loss's fall, O(1) per step (Liu et al. 2023)",
        kind="loss", loss_weighting=FastAdaptiveWeighting, params=("famo_lr", "famo_decay"), needs_exchange=False,
        state=True, step_losses=True,
    ),
    "gradnorm": Method(
        "GradNorm: weights learned to equalise gradient norms' training rates (Chen et al. 2018)",
        kind="loss", loss_weighting=GradNorm, params=("gradnorm_alpha", "gradnorm_lr"), needs_exchange=False,
        state=True, step_losses=True, shared_layer=True,
    ),
    "db_mtl": Method(
        "DB-MTL: log losses with gradient sizes balanced to the largest (Lin et al. 2023)",
        kind="loss", loss_weighting=DualBalancing, params=("db_beta",), needs_exchange=False,
        state=True, step_losses=True, shared_layer=True, mean_scale=False,
    ),
}

GRADIENT_METHODS = [name for name, m in METHODS.items() if m.kind != "loss"]
"""The methods that act on task gradients (and so have a single-process reference, `combine`)."""


def loss_weighting(method: Method, owned: list[str], order: list[str], options: dict,
                   types: dict[str, str] | None = None, gather: Gather | None = None, seed: int = 0,
                   shared: torch.nn.Parameter | LastLayer | None = None) -> LossWeighting:
    """The per-worker loss weighting: the method's own for "loss" methods, equal otherwise (for a
    Gram method with state, its holder: GradVac's targets).
    `types` (task -> "classification" | "regression") picks UW's form per task; `gather` gives
    every task's loss where the method needs it (`step_losses`; default: this process holds
    every task); `seed` is the run's; `shared` the trunk's last weight matrix (or
    `shared_layer.watch` of the trunk), for the methods that measure task gradients there."""
    cls = method.loss_weighting or LossWeighting
    own = options if method.kind == "loss" else {}  # a Gram method's options go to its weights function
    if method.shared_layer:
        if shared is None:
            raise ValueError(f"{method.summary.split(':')[0]} measures task gradients at the trunk's last weight "
                             "matrix, and this trunk has none")
        own = {**own, "shared": shared}
    return cls(owned, order, types, gather=gather, seed=seed, **own)


def combine(grads: torch.Tensor, method: Method | str, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process reference: [K, P] task gradients -> (aggregated [P], weights [K]).
    `method`: a registry entry, or its name (for use in a training loop of your own).

    For coordinate-wise methods the second result is each task's fraction of kept coordinates."""
    m = METHODS[method] if isinstance(method, str) else method
    if m.kind == "coordinate":
        return m.aggregate(grads, seed=seed, **options)
    if m.kind != "gram":
        raise ValueError(f"'{m.summary}' weights losses, not gradients: it has no gradient reference")
    # The Gram in the gradients' own precision (float64 copies of P-vectors cost more than the
    # whole solve); the K x K result is solved in float64.
    gram = (grads @ grads.T).double().cpu()
    w = m.weights(gram, seed=seed, **options)
    return (w.to(grads.dtype).to(grads.device) @ grads), w
