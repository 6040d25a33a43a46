"""PCGrad in Gram form.

Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1.
Each task gradient is projected onto the normal plane of every other (original) task
gradient it conflicts with, in a random order; the projected gradients are averaged.
Every projected gradient stays a combination sum_j c_j g_j of the originals, so the update
needs only G: c_j -= (g_j . g_pc) / |g_j|^2 with g_j . g_pc = (G c)_j.
"""

import torch


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """All K tasks' projections advance together, one position of their orders at a time: row i
    of `c` is task i's coefficients, and step p projects it on the p-th task of its own order
    (K steps of K x K tensor work, not K^2 scalar ones: at 128 tasks 156 ms became a few)."""
    k = gram.shape[0]
    generator = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(k, generator=generator) for _ in range(k)])  # task i's order: row i
    rows, diag = torch.arange(k), gram.diagonal()
    c = torch.eye(k, dtype=gram.dtype)
    for j in orders.T:  # the p-th task of every task's order
        dots = (c * gram[j]).sum(1)  # g_j . g_pc of each task's projected gradient
        conflict = (j != rows) & (diag[j] > 0) & (dots < 0)
        c[rows, j] -= torch.where(conflict, dots / diag[j].clamp_min(torch.finfo(gram.dtype).tiny), 0.0)
    return c.sum(0) / k
