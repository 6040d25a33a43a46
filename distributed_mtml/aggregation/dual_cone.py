"""Projection onto the dual cone of the task gradients, in weight space (UPGrad, DualProj).

The projection of J^T u onto the cone {d : g_j . d >= 0 for all j} is J^T v with
v = argmin_{v >= u} v^T G v, a box-constrained QP in K variables (Quinton & Rey, "Jacobian
Descent for Multi-Objective Optimization", 2024, Proposition 1).

Conditioning: with nearly opposite gradients G is nearly singular and the QP's optimum moves
far on rounding noise. As torchjd does, the QP is solved on G divided by its trace (the
Jacobian at unit Frobenius norm) plus `reg_eps` x I. The QP's optimality conditions then give
(G v)_j >= -reg_eps tr(G) v_j: the update J^T v conflicts with task j by at most reg_eps x tr(G)
x its weight. A G whose trace is below 1e-30 (no task moves) gives v = u.
"""

import torch

REG_EPS = 1e-4
"""The default regularisation, torchjd 0.18's: its tests compare with ours to 1e-6 at this value."""


def project(gram: torch.Tensor, lower: torch.Tensor, reg_eps: float = REG_EPS) -> torch.Tensor:
    """v = argmin_{v >= lower} v^T (G / tr G + reg_eps I) v."""
    trace = float(torch.diagonal(gram).sum())
    if trace < 1e-30:
        return lower.clone()
    return _box_qp(gram / trace + reg_eps * torch.eye(len(gram), dtype=gram.dtype), lower)


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
