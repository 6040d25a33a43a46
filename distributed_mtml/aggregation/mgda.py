"""MGDA: the minimum-norm point of the convex hull of the task gradients.

Reference: Desideri, "Multiple-gradient descent algorithm", 2012; Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
min_{w in simplex} w^T G w. The result is a common descent direction (zero at a Pareto
stationary point, so a task whose gradient is exactly zero makes the whole update zero:
that task is already at a stationary point and no direction improves every task; this is
the method's definition, not a failure). Returned as is: unlike the other methods it does not sum to the mean
scale of the gradients, which is the method's own behaviour.
"""

import numpy as np
import torch

from distributed_mtml.aggregation.simplex import minimise, unit_scale


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    k = gram.shape[0]
    if k == 2:  # closed form of the two-task case
        g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
        denom = g11 - 2 * g12 + g22
        gamma = torch.clamp((g22 - g12) / denom, 0.0, 1.0) if denom > 0 else torch.tensor(0.5, dtype=gram.dtype)
        return torch.stack([gamma, 1 - gamma])
    g = unit_scale(gram).numpy()
    w = minimise(lambda w: w @ g @ w, lambda w: 2 * g @ w, k, steps=60)  # a support guess: _polish finishes
    return torch.from_numpy(_polish(g, w))


def _polish(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The exact min-norm point, by an active-set search started from the iterative solver's
    support: projected gradient finds the support long before it finds the weights (G is
    often ill-conditioned), and on a fixed support the optimum is one linear solve of the KKT
    system. A task whose weight comes out negative leaves the support, one with less than
    |d|^2 along d joins it; if that does not settle in a few rounds, the iterate stands."""
    support = w > 1e-6
    tol = 1e-9 * max(float(np.diag(g).max()), 1e-30)
    for _ in range(2 * len(w)):
        n = int(support.sum())
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n], kkt[:n, n], kkt[n, :n] = g[np.ix_(support, support)], 1.0, 1.0
        solution = np.linalg.lstsq(kkt, np.r_[np.zeros(n), 1.0], rcond=None)[0]
        exact = np.zeros_like(w)
        exact[support] = solution[:n]
        if exact.min() < 0:
            support[np.argmin(exact)] = False
            continue
        slack = g @ exact - exact @ g @ exact
        if slack.min() < -tol:
            support[np.argmin(slack)] = True
            continue
        return exact if exact @ g @ exact <= w @ g @ w + tol else w
    return w
