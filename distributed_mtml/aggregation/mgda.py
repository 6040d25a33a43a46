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
from scipy.optimize import nnls

from distributed_mtml.aggregation.simplex import unit_scale


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The exact min-norm weights, by one non-negative least squares problem.

    With G = A^T A, min over u >= 0 of |A u|^2 + (sum(u) - 1)^2 is, for u = s w (w on the
    simplex), s^2 |A w|^2 + (s - 1)^2, whose best s leaves |A w|^2 / (1 + |A w|^2): increasing
    in |A w|^2, so u / sum(u) is the min-norm point. Lawson-Hanson's active set is exact where
    projected gradient crawls: G is often rank-deficient (more tasks than dimensions, as with
    representation gradients), and there the old iterative solver took 60 ms at 128 tasks
    for what this solves in 3."""
    g = unit_scale(gram).numpy()
    values, vectors = np.linalg.eigh(g)
    keep = values > 1e-9 * max(values.max(), 1e-300)  # below that, rounding noise of a singular G
    a = np.vstack([(vectors[:, keep] * np.sqrt(values[keep])).T, np.ones((1, len(g)))])
    u, _ = nnls(a, np.r_[np.zeros(int(keep.sum())), 1.0], maxiter=50 * len(g))
    return torch.from_numpy(u / u.sum())
