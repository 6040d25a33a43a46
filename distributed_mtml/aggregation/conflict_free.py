"""ConFIG: the update whose direction makes the same angle with every task's gradient.

Reference: Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025. With unit gradients u_i = g_i / |g_i|, the direction is
U^+ 1 = U^T (U U^T)^+ 1 (equal projection on every u_i), and its length the sum of the task
gradients' projections on it. In weights: with D = diag(|g_i|), U U^T = D^-1 G D^-1 and the
direction is J^T c, c = D^-1 (U U^T)^+ 1; the update is (1^T G c / c^T G c) J^T c, divided
by K for the mean's scale (the paper sums). A task whose gradient is zero has no direction and
weighs 0. With identical gradients it is the mean.
"""

import torch


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    k = gram.shape[0]
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=0))
    moving = norms > 0
    out = torch.zeros(k, dtype=gram.dtype)
    if not moving.any():
        return out
    g, n = gram[moving][:, moving], norms[moving]
    c = torch.linalg.pinv(g / n[:, None] / n[None, :], hermitian=True) @ torch.ones(len(n), dtype=gram.dtype) / n
    size = c @ g @ c
    if size <= 0:
        return out
    out[moving] = (g.sum(0) @ c / size) * c / k
    return out
