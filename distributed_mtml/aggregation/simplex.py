"""Small deterministic solvers over the probability simplex, shared by MGDA and CAGrad.

K is the number of tasks (tens at most), so projected gradient descent in float64 with a
fixed iteration budget is exact enough and, unlike an external QP solver, gives bit-identical
answers on every worker.
"""

from typing import Callable

import torch


def project(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0)[-1])
    return torch.clamp(v - css[rho] / (rho + 1), min=0)


def minimise(objective: Callable[[torch.Tensor], torch.Tensor], k: int, steps: int = 500) -> torch.Tensor:
    """argmin of a convex `objective` over the simplex by projected gradient with backtracking."""
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    lr = 1.0
    for _ in range(steps):
        w_var = w.clone().requires_grad_(True)
        value = objective(w_var)
        (grad,) = torch.autograd.grad(value, w_var)
        while lr > 1e-12:
            candidate = project(w - lr * grad)
            if objective(candidate) <= value - 1e-4 * grad @ (w - candidate) + 1e-15:
                break
            lr *= 0.5
        if torch.allclose(candidate, w, atol=1e-12, rtol=0):
            break
        w, lr = candidate, min(lr * 2, 1e3)
    return w.detach()
