"""IMTL-G: the update whose projection onto every task's unit gradient is the same.

Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (gradient part).
With u_i = g_i / |g_i|, D rows g_1 - g_i and U rows u_1 - u_i (i = 2..K):
alpha_{2..K} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum alpha_{2..K}; all products are
entries of G. The alphas sum to one, like the mean's weights. A task whose gradient is exactly
zero has no direction to project on: it gets weight 0 and the others solve the system alone
(otherwise its undefined unit vector would zero the whole update).
"""

import torch


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    moving = torch.diagonal(gram) > 0
    if moving.all() or not moving.any():
        return _weights(gram)
    out = torch.zeros(gram.shape[0], dtype=gram.dtype)
    out[moving] = _weights(gram[moving][:, moving])
    return out


def _weights(gram: torch.Tensor) -> torch.Tensor:
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype)
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-30))
    gu = gram / norms[None, :]  # gu[a, b] = g_a . u_b
    rest = torch.arange(1, k)
    # (D U^T)[i, j] = (g_1 - g_i).(u_1 - u_j);  (g_1 U^T)[j] = g_1.(u_1 - u_j)
    du = gu[0, 0] - gu[0, rest][None, :] - gu[rest, 0][:, None] + gu[rest][:, rest]
    g1u = gu[0, 0] - gu[0, rest]
    # Solved as a minimal change from the mean's weights 1/K: where the system says nothing
    # (collinear gradients, whose unit vectors coincide, or directions the float32 Gram cannot
    # resolve) the weights stay the mean's, whatever the task order, instead of rounding noise
    # growing into huge opposite weights.
    tol = 1e-5 * float(gu.abs().max())
    uniform = torch.full((k - 1,), 1.0 / k, dtype=gram.dtype)
    alpha_rest = uniform + torch.linalg.pinv(du.T, atol=tol) @ (g1u - du.T @ uniform)
    alpha = torch.cat([1 - alpha_rest.sum().unsqueeze(0), alpha_rest])
    return alpha
