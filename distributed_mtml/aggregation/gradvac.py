"""GradVac: each task's gradient moved toward a learned target similarity with every other.

Reference: Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021. For every task i, over the other tasks j in a random
order: with phi the cosine of i's (already adjusted) gradient and g_j, and phi_hat_ij an EMA of
past cosines (`gradvac_beta`), when phi < phi_hat the gradient gets
|g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j,
which raises the cosine to phi_hat; then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. The
update is the mean of the adjusted gradients. As PCGrad, every adjusted gradient stays a
combination of the originals, so G alone gives it: all tasks advance one position of their own
orders at a time.

The targets phi_hat (K x K, starting at 0) are state: every rank computes the same from the same
Gram and seed, and rank 0 saves them with the checkpoint (`Targets`, held where a loss weighting
would be). Without a state (`combine` called alone) each call starts from zero targets. Not
task-order independent: the order is the seeded draw, as PCGrad's.
"""

from __future__ import annotations

import torch

from distributed_mtml.aggregation.loss_weighting import LossWeighting
from distributed_mtml.aggregation.simplex import unit_scale

EPS = 1e-8  # in the denominators, as torchjd's, here relative to the mean gradient norm (G at unit mean diagonal)


class Targets(LossWeighting):
    """The EMA target cosines phi_hat [K, K], suite order; equal loss weights otherwise."""

    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None, **common):
        super().__init__(owned, order, types, **common)
        self.register_buffer("phi_hat", torch.zeros(len(order), len(order), dtype=torch.float64))

    def gram_options(self) -> dict:
        return {"state": self}


def weights(gram: torch.Tensor, *, seed: int = 0, gradvac_beta: float = 0.5, state: Targets | None = None
            ) -> torch.Tensor:
    k, gram = gram.shape[0], unit_scale(gram)  # cosines and the gain are scale-free; EPS is not
    phi_hat = state.phi_hat.to(gram) if state is not None else torch.zeros(k, k, dtype=gram.dtype)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(k)
    orders = torch.stack([rows[rows != i][torch.randperm(k - 1, generator=generator)] for i in rows])  # row i: i's order
    norms = gram.diagonal().clamp_min(0).sqrt()
    c = torch.eye(k, dtype=gram.dtype)
    for j in orders.T:  # the p-th other task of every task's order
        cg = c @ gram  # row i: g_i^adjusted . g_m for every m
        own = (c * cg).sum(1).clamp_min(0).sqrt()  # |g_i^adjusted|
        phi = (cg[rows, j] / (own * norms[j] + EPS)).clamp(-1, 1)  # a Gram rounded from float32 is not quite PSD
        target = phi_hat[rows, j]
        low = (phi < target) & (own > 0) & (norms[j] > 0)  # a task without a gradient has no direction to move
        gain = own * (target * (1 - phi**2).clamp_min(0).sqrt() - phi * (1 - target**2).clamp_min(0).sqrt()) \
            / (norms[j] * (1 - target**2).clamp_min(0).sqrt() + EPS)
        c[rows, j] += torch.where(low, gain, 0.0)
        phi_hat[rows, j] = (1 - gradvac_beta) * target + gradvac_beta * phi
    if state is not None:
        state.phi_hat = phi_hat.to(state.phi_hat)
    return c.sum(0) / k
