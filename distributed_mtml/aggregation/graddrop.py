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
    """[K, P] task gradients -> (update [P] on the mean's scale, fraction of coordinates kept per task [K],
    estimated on a strided sample for large P).

    With S+ and S- the sums of the positive and of the negative entries of a coordinate,
    P = S+ / (S+ - S-), and the kept gradients sum to S+ when the positive sign is drawn and
    to S- otherwise: two reductions and no [K, P] mask on the update's path.
    """
    k, p = grads.shape
    total = grads.sum(0)
    positive = grads.clamp(min=0).sum(0)
    negative = total - positive
    draw = torch.rand(p, generator=torch.Generator().manual_seed(seed), dtype=grads.dtype).to(grads.device)
    choose_positive = positive > draw * (positive - negative)  # P > U without dividing by zero
    kept = torch.where(choose_positive, positive, negative)
    update = kept / k if leak == 0 else (leak * total + (1 - leak) * kept) / k
    # the kept fraction is only logged: estimate it on at most 2^16 evenly strided coordinates
    stride = max(1, p >> 16)
    sample, chosen = grads[:, ::stride], choose_positive[::stride]
    fraction = torch.where(chosen, sample > 0, sample < 0).double().mean(1)
    return update, fraction.cpu()
