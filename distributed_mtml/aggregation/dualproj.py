"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

Reference: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
(its Equation 11), as torchjd's DualProj applies it to multi-task learning. One projection
(`dual_cone.project`) of the mean instead of UPGrad's K: with no conflict it is the mean.
"""

import torch

from distributed_mtml.aggregation.dual_cone import REG_EPS, project


def weights(gram: torch.Tensor, *, seed: int = 0, reg_eps: float = REG_EPS) -> torch.Tensor:
    k = gram.shape[0]
    return project(gram, torch.full((k,), 1.0 / k, dtype=gram.dtype), reg_eps)
