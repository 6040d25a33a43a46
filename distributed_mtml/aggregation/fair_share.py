"""The weights w > 0 with G w = w^(-p): Nash-MTL's bargaining solution (p = 1) and FairGrad's
alpha-fair one (p = 1 / alpha).

They are the stationary point of phi(w) = 1/2 w^T G w + sum_i h(w_i), h(w) = -log w for p = 1,
else -w^(1-p) / (1-p): convex, with Hessian G + diag(p w^(-p-1)), positive definite for w > 0.
Damped Newton (a backtracking line search that keeps w positive and decreases phi) reaches the
point to rounding error in a few dozen steps: no cvxpy, no iterative relinearisation. A task
whose gradient is zero has no finite share (phi is unbounded below along it) and weighs 0.
"""

import torch


def solve(gram: torch.Tensor, p: float, steps: int = 100) -> torch.Tensor:
    moving = torch.diagonal(gram) > 0
    out = torch.zeros(len(gram), dtype=gram.dtype)
    if moving.any():
        out[moving] = _newton(gram[moving][:, moving], p, steps)
    return out


def _newton(g: torch.Tensor, p: float, steps: int) -> torch.Tensor:
    w = 1 / torch.sqrt(torch.clamp(g.sum(1), min=torch.diagonal(g)))  # Nash's answer for identical gradients
    for _ in range(steps):
        grad = g @ w - w ** (-p)
        if (grad.abs() <= 1e-13 * w ** (-p)).all():  # each task's condition holds to rounding
            break
        hess = g + torch.diag(p * w ** (-p - 1))
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while ((w - t * step) <= 0).any() or _phi(g, w - t * step, p) > _phi(g, w, p) - 1e-4 * t * (grad @ step):
            t /= 2
            if t < 1e-12:
                return w
        w = w - t * step
    return w


def _phi(g: torch.Tensor, w: torch.Tensor, p: float) -> float:
    own = -torch.log(w).sum() if p == 1 else -(w ** (1 - p)).sum() / (1 - p)
    return float(0.5 * w @ g @ w + own)
