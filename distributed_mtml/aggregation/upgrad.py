"""UPGrad: average of each task gradient projected onto the dual cone of all task gradients.

Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
Each g_i = J^T e_i is projected (`dual_cone.project`, with its regularisation `reg_eps`); the
weights are the mean of the projections' weights, so with no conflict they are 1/K each.
"""

import torch

from distributed_mtml.aggregation.dual_cone import REG_EPS, project


def weights(gram: torch.Tensor, *, seed: int = 0, reg_eps: float = REG_EPS) -> torch.Tensor:
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype)
    return torch.stack([project(gram, eye[i], reg_eps) for i in range(k)]).mean(0)
