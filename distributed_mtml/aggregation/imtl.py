"""IMTL-G: the update whose projection onto every task's unit gradient is the same.

Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (gradient part).
With u_i = g_i / |g_i|, D rows g_1 - g_i and U rows u_1 - u_i (i = 2..K):
alpha_{2..K} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum alpha_{2..K}; all products are
entries of G. The alphas sum to one, like the mean's weights; with identical gradients
any such alpha gives the mean itself.
"""

import torch


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    k = gram.shape[0]
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-30))
    gu = gram / norms[None, :]  # gu[a, b] = g_a . u_b
    rest = torch.arange(1, k)
    # (D U^T)[i, j] = (g_1 - g_i).(u_1 - u_j);  (g_1 U^T)[j] = g_1.(u_1 - u_j)
    du = gu[0, 0] - gu[0, rest][None, :] - gu[rest, 0][:, None] + gu[rest][:, rest]
    g1u = gu[0, 0] - gu[0, rest]
    # Directions the float32 Gram cannot resolve (near-identical gradients) are rounding
    # noise; a pseudo-inverse that drops them keeps the weights at the mean's instead of
    # amplifying that noise into huge opposite weights.
    tol = 1e-5 * float(gu.abs().max())
    alpha_rest = torch.linalg.pinv(du.T, atol=tol) @ g1u
    alpha = torch.cat([1 - alpha_rest.sum().unsqueeze(0), alpha_rest])
    return alpha
