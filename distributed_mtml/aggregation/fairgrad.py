"""FairGrad: the update that shares the tasks' improvement alpha-fairly.

Reference: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024. The weights
solve G w = w^(-1/alpha) (`fair_share`): alpha = 1 is proportional fairness (Nash-MTL's
condition without its normalisation), larger alpha favours the task that improves least
(alpha -> infinity: max-min fairness). alpha = 0 is the mean.

Not the mean's scale: with K identical gradients of squared norm s the weights are
(K s)^(-alpha / (1 + alpha)) each, the method's own step size.
"""

import torch

from distributed_mtml.aggregation.fair_share import solve


def weights(gram: torch.Tensor, *, seed: int = 0, fairgrad_alpha: float = 1.0) -> torch.Tensor:
    k = gram.shape[0]
    if fairgrad_alpha == 0:
        return torch.full((k,), 1.0 / k, dtype=gram.dtype)
    return solve(gram, 1.0 / fairgrad_alpha)
