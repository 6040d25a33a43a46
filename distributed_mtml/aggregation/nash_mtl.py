"""Nash-MTL: the update from the tasks' Nash bargaining solution.

Reference: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. The weights
solve G w = 1/w (each task's share of the update's improvement is inversely proportional to its
weight), here on G divided by its Frobenius norm as the authors' code does, solved exactly
(`fair_share`) where the paper relinearises with cvxpy. The update's norm is then at most
`max_norm` (the authors' default 1; 0 turns it off).

Not the mean's scale: with K identical gradients g the update is sqrt(K |G|_F) g / |g| before
the clip, the method's own step size.
"""

import torch

from distributed_mtml.aggregation.fair_share import solve


def weights(gram: torch.Tensor, *, seed: int = 0, max_norm: float = 1.0) -> torch.Tensor:
    size = torch.linalg.norm(gram)
    if size == 0:
        return torch.zeros(len(gram), dtype=gram.dtype)
    w = solve(gram / size, 1.0)
    norm = torch.sqrt(torch.clamp(w @ gram @ w, min=0))
    return w * (max_norm / norm) if max_norm > 0 and norm > max_norm else w
