"""Aligned-MTL: the task gradients made orthogonal and of equal size before they are averaged.

Reference: Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
With G = V diag(lambda) V^T (its rank r nonzero eigenvalues), the aligned gradients are
B^T J with B = sqrt(scale) V_r diag(lambda_r)^-1/2 V_r^T: their Gram is scale x the projector on
the gradients' span, so no task's gradient outweighs or cancels another's. `scale` is the
smallest nonzero eigenvalue (the paper's choice; `scale_mode: median | rmse` as torchjd offers,
rmse meaning their mean). The weights are B times the mean's 1/K. With identical gradients (rank
one) they are the mean's.
"""

from typing import Literal

import torch

ScaleMode = Literal["min", "median", "rmse"]


def weights(gram: torch.Tensor, *, seed: int = 0, scale_mode: ScaleMode = "min") -> torch.Tensor:
    k = gram.shape[0]
    return balance(gram, scale_mode) @ torch.full((k,), 1.0 / k, dtype=gram.dtype)


def balance(gram: torch.Tensor, scale_mode: ScaleMode = "min") -> torch.Tensor:
    """B: the K x K map from the task gradients to the aligned ones (the identity when no
    gradient moves)."""
    values, vectors = torch.linalg.eigh(gram)
    tol = values.max() * len(gram) * torch.finfo(gram.dtype).eps
    kept = values > tol
    if not kept.any():
        return torch.eye(len(gram), dtype=gram.dtype)
    values, vectors = values[kept], vectors[:, kept]
    scale = {"min": values.min(), "median": values.median(), "rmse": values.mean()}[scale_mode]
    return scale.sqrt() * (vectors / values.sqrt()) @ vectors.T
