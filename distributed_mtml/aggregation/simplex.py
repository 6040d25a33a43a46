"""Small deterministic solvers over the probability simplex: CAGrad's, and the Gram scaling
MGDA shares.

For CAGrad's objective projected gradient descent in float64 numpy with a fixed iteration
budget is exact enough and gives bit-identical answers on every worker (MGDA's quadratic has
an exact active-set solver, `scipy.optimize.nnls`; see mgda.py). numpy, not torch: at K x K
the per-call overhead is what costs, and it runs every step.
"""

from typing import Callable

import numpy as np
import torch


def unit_scale(gram: torch.Tensor) -> torch.Tensor:
    """G divided by its mean diagonal. MGDA's and CAGrad's weights do not change when G is
    scaled, but the solver's tolerances are absolute: tiny gradients (late in training, small
    models) cost it hundreds of iterations (12 ms a step instead of 1) unless G is rescaled."""
    scale = torch.diagonal(gram).mean()
    return gram / scale if scale > 0 else gram


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
        if np.abs(candidate - w).max() < 1e-9:  # weights to 1e-9: far below what a step can feel
            break
        w, lr = candidate, min(lr * 2, 1e3)
    return w
