"""GradDrop: per coordinate, keep only the gradients that agree with a randomly drawn sign.

Reference: Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
Sign Dropout", NeurIPS 2020. Per coordinate, the positive-sign purity is
P = (1 + sum_i g_i / sum_i |g_i|) / 2; with U ~ U[0, 1) the positive sign is kept when P > U,
the negative one otherwise, and each task's gradient keeps its coordinate only where its
sign is the kept one. `leak` in [0, 1] lets that fraction of every gradient through
unmasked (the paper's leak parameter, the same for all tasks here).

Unlike the Gram methods this is coordinate-wise, so it needs every task's full gradient on
every worker; the all-gather already provides it. The paper applies the mask to the
gradient at a shared activation layer; here it masks the trunk's parameter gradients,
which keeps one code path for every method (noted in the README).
"""

import torch


def aggregate(grads: torch.Tensor, *, seed: int = 0, leak: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, P] task gradients -> (update [P] on the mean's scale, fraction of coordinates kept per task [K])."""
    k, p = grads.shape
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0).clamp_min(torch.finfo(grads.dtype).tiny))
    draw = torch.rand(p, generator=torch.Generator().manual_seed(seed), dtype=grads.dtype).to(grads.device)
    keep = torch.where(purity > draw, grads > 0, grads < 0)
    masked = torch.where(keep, grads, torch.zeros((), dtype=grads.dtype, device=grads.device))
    update = (leak * grads.sum(0) + (1 - leak) * masked.sum(0)) / k
    return update, keep.double().mean(1).cpu()
