"""Trunk-gradient aggregation: methods are pure functions of the task Gram matrix.

Every method maps the K x K Gram matrix G = [g_i . g_j] of the task gradients (and a seed,
for methods with a random order) to K weights w; the trunk update is sum_i w_i g_i. Methods
never touch `.grad` or `torch.distributed`: forming G across workers lives in `exchange.py`.
Weights follow the mean convention: with no conflict every method returns 1/K each, the
plain DDP average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from distributed_mtml.aggregation import cagrad, imtl, mean, mgda, pcgrad, upgrad


@dataclass(frozen=True)
class Method:
    weights: Callable[..., torch.Tensor]  # (gram [K, K] float64, *, seed: int, **params) -> [K]
    summary: str
    needs_exchange: bool = True  # False: DDP's own gradient average is the method
    params: tuple[str, ...] = ()  # keys of the `aggregation` config section it takes


METHODS: dict[str, Method] = {
    "mean": Method(mean.weights, "equal weights: plain DDP averaging", needs_exchange=False),
    "pcgrad": Method(pcgrad.weights, "PCGrad: project away conflicting components (Yu et al. 2020)"),
    "cagrad": Method(
        cagrad.weights, "CAGrad: best worst-case improvement near the mean (Liu et al. 2021)", params=("c",)
    ),
    "mgda": Method(mgda.weights, "MGDA: min-norm point of the convex hull (Desideri 2012; Sener & Koltun 2018)"),
    "upgrad": Method(upgrad.weights, "UPGrad: mean of projections onto the dual cone (Quinton & Rey 2024)"),
    "imtl": Method(imtl.weights, "IMTL-G: equal projection onto every task direction (Liu et al. 2021)"),
}
