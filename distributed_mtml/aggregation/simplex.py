"""Small deterministic solvers over the probability simplex, shared by MGDA and CAGrad.

K is the number of tasks (tens at most), so projected gradient descent in float64 numpy with
a fixed iteration budget is exact enough and, unlike an external QP solver, gives
bit-identical answers on every worker. numpy, not torch: at K x K the per-call overhead is
what costs, and it runs every step.
"""

from typing import Callable

import numpy as np


def project(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0)


def minimise(
    objective: Callable[[np.ndarray], float],
    gradient: Callable[[np.ndarray], np.ndarray],
    k: int,
    steps: int = 500,
) -> np.ndarray:
    """argmin of a convex `objective` over the simplex by projected gradient with backtracking."""
    w = np.full(k, 1.0 / k)
    lr = 1.0
    for _ in range(steps):
        value, grad = objective(w), gradient(w)
        while lr > 1e-12:
            candidate = project(w - lr * grad)
            if objective(candidate) <= value - 1e-4 * grad @ (w - candidate) + 1e-15:
                break
            lr *= 0.5
        if np.abs(candidate - w).max() < 1e-12:
            break
        w, lr = candidate, min(lr * 2, 1e3)
    return w
