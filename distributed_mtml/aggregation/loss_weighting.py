"""Loss-weighting methods: each task's loss gets a multiplier before the ordinary backward.

They need no gradient exchange: every worker scales the losses of the tasks it owns and
DDP's average does the rest, so they cost what `mean` costs. Their state (UW's learned
log-variances, DWA's loss history) is training state, checkpointed with the optimiser.

The effective weight of task i in the trunk update is multiplier_i / K, the same scale as
the Gram methods' weights (1/K each for `mean`); that is what `weights()` reports.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from distributed_mtml.segments import in_suite_order


def as_vector(losses: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The owned tasks' losses as one [tasks] tensor: `models.task_losses` gives one; a list of
    scalar losses is stacked."""
    return losses if isinstance(losses, torch.Tensor) else torch.stack(list(losses))

Gather = Callable[[torch.Tensor], torch.Tensor]
"""The owned tasks' values ([n], `owned` order) -> every task's ([K], suite order), the same on
every rank: the worker's all-reduce of one float per task, or in one process a reordering."""


class LossWeighting(nn.Module):
    """Equal weights; the base of the others.

    A weighting that needs every task's loss at each step (GLS, STCH, FAMO) reads them through
    `suite_losses`, detached: its multipliers then come out the same on every rank, and a rank
    only multiplies the losses it owns. `seed` is the run's, for weightings that draw (RLW)."""

    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 gather: Gather | None = None, seed: int = 0):
        super().__init__()
        self.owned, self.order, self.seed = owned, order, seed
        self.types = types or {}  # task -> "classification" | "regression" (default)
        self.gather = gather or (lambda values: in_suite_order(values, owned, order, 0.0))
        where = {name: i for i, name in enumerate(order)}
        self.places = torch.tensor([where[name] for name in owned], dtype=torch.long)  # owned tasks' suite places

    def gram_options(self) -> dict:
        """What a Gram method with state takes beside its config options (GradVac: its targets)."""
        return {}

    def suite_losses(self, losses: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """This step's loss of every task, [K] float64 in suite order, detached."""
        return self.gather(as_vector(losses).detach().double())

    def multipliers(self) -> torch.Tensor:
        """One multiplier per owned task, in `owned` order."""
        return torch.ones(len(self.owned))

    def total(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        """The sum of the owned tasks' weighted losses, with any regulariser. `rows`: each owned
        task's rows in this step's batch, where the step knows them (`shared_layer.norms` uses them)."""
        losses = as_vector(losses)
        return (losses * self.multipliers().to(losses.device)).sum()

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The learned parameters that belong to one owned task: they move with it when an
        elastic run places its tasks anew (checkpoints are keyed by task)."""
        return []

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The state that is no one task's (DWA's loss history), which rank 0 saves for all."""
        owned = {id(p) for n in self.owned for p in self.task_parameters(n)}
        named = dict(self.named_parameters())
        return {k: v for k, v in self.state_dict().items() if k not in named or id(named[k]) not in owned}

    def weights(self) -> dict[str, float]:
        m = self.multipliers().detach()
        return {n: float(v) / len(self.order) for n, v in zip(self.owned, m)}

    def end_epoch(self, epoch_losses: torch.Tensor) -> None:
        """Every task's mean training loss this epoch, [K] in suite order, same on all ranks."""


class StepWeighting(LossWeighting):
    """A weighting whose multipliers come from each step's losses (GLS, STCH, FAMO, DB-MTL):
    `suite_multipliers` gives every task's, in suite order, and `multipliers` is the last step's
    owned part (what `weights()` reports)."""

    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None, **common):
        super().__init__(owned, order, types, **common)
        self.register_buffer("last", torch.ones(len(owned)), persistent=False)

    def multipliers(self) -> torch.Tensor:
        return self.last

    def total(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        self.last = self.suite_multipliers(losses, rows)[self.places].float().to(self.last.device)
        return super().total(losses)

    def suite_multipliers(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        raise NotImplementedError


class UncertaintyWeighting(LossWeighting):
    """UW (Kendall et al., CVPR 2018) with a learned s_i = log sigma_i^2 per task, in the paper's
    form for each task type: regression L_i / (2 e^{s_i}) + s_i / 2 (Gaussian likelihood),
    classification L_i / e^{s_i} + s_i / 2 (its scaled-softmax approximation).

    s_i starts at -0.5 as in LibMTL's configuration; a noisy task learns a large s_i and so a
    small weight. Each s_i lives on the worker that owns the task: only its loss depends on it.
    """

    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None, **common):
        super().__init__(owned, order, types, **common)
        self.log_var = nn.ParameterList([nn.Parameter(torch.tensor(-0.5)) for _ in owned])  # one per task
        factor = [1.0 if self.types.get(n) == "classification" else 0.5 for n in owned]
        self.register_buffer("factor", torch.tensor(factor), persistent=False)

    def log_variances(self) -> torch.Tensor:
        return torch.stack(list(self.log_var))

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.log_var[self.owned.index(task)]]

    def multipliers(self) -> torch.Tensor:
        return self.factor * torch.exp(-self.log_variances())

    def total(self, losses: torch.Tensor | list[torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        return super().total(losses) + 0.5 * self.log_variances().sum()


class DynamicWeightAverage(LossWeighting):
    """DWA (Liu et al., CVPR 2019): w_i = K softmax_i(r_i / T) with r_i = L_i(e-1) / L_i(e-2),
    from epoch-mean training losses; equal weights for the first two epochs.

    A task whose loss falls more slowly gets more weight. The ratios need every task's loss,
    so `end_epoch` takes the suite-wide vector that the worker all-reduces once per epoch.
    """

    def __init__(self, owned: list[str], order: list[str], types: dict[str, str] | None = None,
                 temperature: float = 2.0, **common):
        super().__init__(owned, order, types, **common)
        self.temperature = temperature
        self.register_buffer("history", torch.zeros(2, len(order), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def multipliers(self) -> torch.Tensor:
        if self.seen < 2:
            return torch.ones(len(self.owned))
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        w = len(self.order) * torch.softmax(ratio / self.temperature, dim=0)
        return w[self.places].float()

    def end_epoch(self, epoch_losses: torch.Tensor) -> None:
        self.history = torch.stack([self.history[1], epoch_losses.to(self.history)])
        self.seen += 1
