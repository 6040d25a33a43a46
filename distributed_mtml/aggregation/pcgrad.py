"""PCGrad in Gram form.

Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1.
Each task gradient is projected onto the normal plane of every other (original) task
gradient it conflicts with, in a random order; the projected gradients are averaged.
Every projected gradient stays a combination sum_j c_j g_j of the originals, so the update
needs only G: c_j -= (g_j . g_pc) / |g_j|^2 with g_j . g_pc = (G c)_j.
"""

import torch


def weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    k = gram.shape[0]
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(k, dtype=gram.dtype)
    for i in range(k):
        c = torch.zeros(k, dtype=gram.dtype)
        c[i] = 1.0
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i or gram[j, j] <= 0:
                continue
            dot = gram[j] @ c
            if dot < 0:
                c[j] -= dot / gram[j, j]
        total += c
    return total / k
