"""CAGrad: the update that maximises the worst task improvement within a ball around the mean.

Reference: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
2021. Dual: w* = argmin_{w in simplex} w^T G b + c |g0| sqrt(w^T G w), b = 1/K, |g0|^2 = b^T G b;
update d = g0 + (c |g0| / |g_w|) g_w, rescaled by 1 / (1 + c^2) (the paper's rescale=1).
c = 0 is plain averaging.
"""

import numpy as np
import torch

from distributed_mtml.aggregation.simplex import minimise, unit_scale


def weights(gram: torch.Tensor, *, seed: int = 0, c: float = 0.4) -> torch.Tensor:
    k, gram = gram.shape[0], unit_scale(gram)
    b = torch.full((k,), 1.0 / k, dtype=gram.dtype)
    g0_norm = torch.sqrt(torch.clamp(b @ gram @ b, min=0))
    if c == 0 or g0_norm == 0:
        return b
    scale = float(c * g0_norm)
    g, gb = gram.numpy(), (gram @ b).numpy()
    norm = lambda w: np.sqrt(max(w @ g @ w, 1e-20))  # noqa: E731 - |g_w|
    w = torch.from_numpy(minimise(lambda w: w @ gb + scale * norm(w), lambda w: gb + scale * (g @ w) / norm(w), k))
    gw_norm = torch.sqrt(torch.clamp(w @ gram @ w, min=0))
    if gw_norm < 1e-12:
        return b
    return (b + (scale / gw_norm) * w) / (1 + c**2)
