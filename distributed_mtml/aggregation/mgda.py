"""MGDA: the minimum-norm point of the convex hull of the task gradients.

Reference: Desideri, "Multiple-gradient descent algorithm", 2012; Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
min_{w in simplex} w^T G w. The result is a common descent direction (zero at a Pareto
stationary point). Returned as is: unlike the other methods it does not sum to the mean
scale of the gradients, which is the method's own behaviour.
"""

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
    w = minimise(lambda w: w @ g @ w, lambda w: 2 * g @ w, k)
    return torch.from_numpy(w)
