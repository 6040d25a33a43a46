"""UPGrad: average of each task gradient projected onto the dual cone of all task gradients.

Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
The projection of g_i onto {d : g_j . d >= 0 for all j} is J^T u with
u = argmin_{u >= e_i} u^T G u (a box-constrained QP in K variables); the weights are the mean
of the u over i, so with no conflict (u = e_i) they are 1/K each.
"""

import torch


def _box_qp(gram: torch.Tensor, lower: torch.Tensor, steps: int = 2000) -> torch.Tensor:
    """argmin u^T G u subject to u >= lower, by projected gradient with step 1/lambda_max."""
    lam = float(torch.linalg.eigvalsh(gram).max())
    if lam <= 0:
        return lower.clone()
    u = lower.clone()
    for _ in range(steps):
        nxt = torch.maximum(lower, u - (gram @ u) / lam)
        if torch.allclose(nxt, u, atol=1e-13, rtol=0):
            break
        u = nxt
    return _polish(gram, lower, u)


def _polish(gram: torch.Tensor, lower: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The exact box-QP optimum by an active-set search from the iterate's free set: projected
    gradient with step 1/lambda_max crawls when G is ill-conditioned (gradients of very
    different sizes), but on a fixed free set F the optimum solves G_FF u_F = -G_FB l_B. An
    entry that falls below its bound is fixed there; a bound one with negative (G u) is freed."""
    free = u > lower + 1e-9
    tol = 1e-9 * max(float(torch.diagonal(gram).max()), 1e-30)
    for _ in range(2 * len(u)):
        exact = lower.clone()
        if free.any():
            rhs = -gram[free][:, ~free] @ lower[~free]
            exact[free] = torch.linalg.lstsq(gram[free][:, free], rhs.unsqueeze(1)).solution.squeeze(1)
        below = exact - lower
        if below.min() < -1e-12:
            free[torch.argmin(below)] = False
            continue
        pull = torch.where(free, torch.zeros_like(u), gram @ exact)
        if pull.min() < -tol:
            free[torch.argmin(pull)] = True
            continue
        return exact if exact @ gram @ exact <= u @ gram @ u + tol else u
    return u


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype)
    return torch.stack([_box_qp(gram, eye[i]) for i in range(k)]).mean(0)
