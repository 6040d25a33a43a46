"""`shared_plus_offset`: a head shared by the tasks of one type and width, plus a penalised
per-task deviation of each of its parameters: task t's head has parameters w + v_t, and its loss
gains (lambda / n_t) ||v_t||^2, n_t its train rows.

Why that strength: per row of a task, a mixed model's negative log-likelihood is
mean (residual^2) / (2 sigma^2) + ||v_t||^2 / (2 tau^2 n_t); times 2 sigma^2 that is the mean
squared error plus (sigma^2 / tau^2) / n_t ||v_t||^2. So lambda plays sigma^2 / tau^2 (residual
over between-task variance), and a task with more rows leans less on the shared head, as a random
effect's shrinkage does. An infinite lambda leaves no offsets (one shared head); zero leaves them
free (as expressive as separate heads).

Gradient steps alone fit a task's offsets slowly: with a few dozen rows a task takes one step an
epoch, and early stopping ends the run long before they settle (measured: offsets re-solved after
training cut a 120-group suite's test MSE by 4%). So after every epoch, `refit` solves each
regression task's last-layer offsets exactly: the ridge regression of the shared head's residual
on the task's train features, toward zero, the penalised loss's own minimiser (a mixed model's
BLUP for fixed variance components). With `head_penalty: auto`, lambda is learned from the data
at the same time: the grid value whose leave-one-out error, summed over every task's train rows
(on every worker), is least; closed form per task, no validation rows used.

`head_penalty: em` (the default) solves the last layer as a linear mixed model (`_em`): the
shared weights are its fixed effects, solved too, each task's offsets its random effects, with
a prior variance per last-layer input and the bias, and the residual variance, learned over
every task's train rows (EM: Dempster, Laird & Rubin 1977; the E step is each task's ridge
solve; variances by MacKay's fixed point). Offsets then go where tasks differ and nowhere else:
with `model.trunk.passthrough` the last layer reads the inputs themselves, and the learned
variances are random slopes on the inputs that vary between tasks, as a mixed model's. The
penalty per input is saved with each head (`precision`), so a new group is solved with it
(`solve_offsets`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from distributed_mtml.collective import summed
from distributed_mtml.heads.separate import stack
from distributed_mtml.segments import row_places, row_tasks

if TYPE_CHECKING:
    from distributed_mtml.config import ModelConfig

LAMBDAS = torch.logspace(-2, 4, 31, dtype=torch.float64)  # what `auto` chooses among
START = 10.0  # `auto`'s lambda before the first refit
EM_STEPS = 100  # EM iterations of the first refit (each one all-reduce of 3d + 1 floats): from cold, 50 were
WARM_STEPS = 5  # not enough on the `multilevel` suites; each later epoch starts from the last one's variances (5
# warm steps tested no worse than 25 there: the benchmarks page)


def shared(out_width: int, cfg: ModelConfig, trunk_out: int) -> nn.Module:
    return stack(trunk_out, out_width, cfg)


class OffsetHead(nn.Module):
    """The shared head evaluated at its parameters plus this task's offsets (zero at start).

    In training a worker binds its tasks' offsets to one stacked `heads.offset_bank.OffsetBank`: the
    offsets are then row `row` of its parameters, and the head's state dict still holds them as
    its own (`offsets.0`, `offsets.1`), so a saved head reads the same bound or not."""

    bank: nn.Module | None = None  # set by `bind`; not registered: the worker's optimiser holds it
    row: int = 0

    def __init__(self, shared_part: nn.Module, penalty: float | str, rows: int):
        super().__init__()
        object.__setattr__(self, "shared", shared_part)  # not registered: saved and synchronised once, apart
        self.rows = max(rows, 1)
        lam = START if penalty in ("auto", "em") else float(penalty)
        self.offsets = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(p)) for p in shared_part.parameters()] if not math.isinf(lam) else [])
        self.register_buffer("lam", torch.tensor(lam, dtype=torch.float64))  # saved: `auto` learns it
        # the last layer's penalty per input and the bias (`em` learns it; else lam on each)
        self.register_buffer("precision", torch.full((shared_part[1].in_features + 1,), lam, dtype=torch.float64))

    @property
    def offsets(self) -> nn.ParameterList | list[torch.Tensor]:
        """The task's deviation of each shared parameter: its own parameters, or its row of the bank."""
        if self.bank is None:
            return self._modules["offsets"]
        return [self.bank.weight[self.row], self.bank.bias[self.row]]

    def bind(self, bank: nn.Module, row: int) -> None:
        """From now on the offsets are row `row` of `bank` (which starts from their values)."""
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "row", row)
        self._modules["offsets"] = nn.ParameterList()
        self._buffers["lam"] = bank.lam[row]  # a view: a refit or a load writes the bank's

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bank is not None:  # a bound head's file holds its row, as an unbound head's own offsets
            for i, v in enumerate(self.offsets):
                destination[f"{prefix}offsets.{i}"] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        """Heads saved before `precision` existed penalised every input alike, by lam. A bound
        head takes its offsets into its row of the bank."""
        if prefix + "lam" in state_dict and prefix + "precision" not in state_dict:
            state_dict[prefix + "precision"] = torch.full_like(self.precision, float(state_dict[prefix + "lam"]))
        if self.bank is not None:
            with torch.no_grad():
                for i, v in enumerate(self.offsets):
                    key = f"{prefix}offsets.{i}"
                    if key in state_dict:
                        v.copy_(state_dict.pop(key))
                    else:
                        missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)

    def _with_offsets(self) -> dict[str, torch.Tensor]:
        return {n: p + v for (n, p), v in zip(self.shared.named_parameters(), self.offsets)}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not len(self.offsets):
            return self.shared(features)
        return functional_call(self.shared, self._with_offsets(), (features,))

    def penalty(self) -> torch.Tensor | None:
        if not len(self.offsets) or float(self.lam) == 0:
            return None
        return (float(self.lam) / self.rows) * sum((v * v).sum() for v in self.offsets)

    def standalone(self) -> nn.Module:
        """One ordinary head with this task's parameters w + v_t: what transfer starts from."""
        head = copy.deepcopy(self.shared)
        with torch.no_grad():
            for p, v in zip(head.parameters(), self.offsets):
                p.add_(v)
        return head

    def last_layer_problem(self, features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(design [n, d + 1]: the last layer's inputs and a 1 for its bias; the residual [n] of
        the shared last layer), in float64: what the last layer's offsets must explain."""
        hidden, last = self.shared[0], self.shared[1]
        params = {n[2:]: p for n, p in self._with_offsets().items() if n.startswith("0.")}
        h = functional_call(hidden, params, (features,)) if params else hidden(features)
        residual = target - last(h).squeeze(-1)
        return torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1).double(), residual.double()

    def set_last_offsets(self, solution: torch.Tensor) -> None:
        with torch.no_grad():
            self.offsets[-2].copy_(solution[:-1].view_as(self.offsets[-2]))
            self.offsets[-1].copy_(solution[-1:].view_as(self.offsets[-1]))


def _one_shared_linear(heads: list[nn.Module]) -> bool:
    """Whether `heads` are `OffsetHead`s with offsets over one shared head that is a single linear
    layer (no `model.head_hidden`): what lets many tasks go through it at once. (A bound head is
    one: `offset_bank` binds no other.)"""
    first = heads[0] if heads else None
    return isinstance(first, OffsetHead) and not len(first.shared[0]) and all(
        isinstance(h, OffsetHead) and h.shared is first.shared and (h.bank is not None or len(h.offsets) == 2)
        for h in heads)


def _bank_rows(heads: list[OffsetHead]) -> tuple[nn.Module, torch.Tensor | None] | None:
    """(the bank every head of `heads` is bound to, their rows of it; None when they are all its
    rows in order: a worker's step), or None when they are not all rows of one bank."""
    bank = heads[0].bank
    if bank is None or not all(h.bank is bank for h in heads):
        return None
    if len(heads) == len(bank.weight) and all(h.row == i for i, h in enumerate(heads)):
        return bank, None
    return bank, torch.tensor([h.row for h in heads], device=bank.weight.device)


def _stacked(heads: list[OffsetHead]) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' offsets as [T, k, d] and [T, k]: their bank itself (no copy), its rows indexed,
    or each head's own stacked."""
    found = _bank_rows(heads)
    if found is None:
        return torch.stack([h.offsets[0] for h in heads]), torch.stack([h.offsets[1] for h in heads])
    bank, rows = found
    return (bank.weight, bank.bias) if rows is None else (bank.weight[rows], bank.bias[rows])


def stacked_output(heads: list[nn.Module], joined: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """Many tasks' outputs in one pass when their heads are `OffsetHead`s of one shared linear
    layer (no `model.head_hidden`): `joined` holds `sizes[i]` rows of task i in order, and each
    row goes through W + V_t, b + c_t of its task, the offsets stacked by task and gathered by row
    (one matrix product, not a call a task). [rows, k]; None for other heads."""
    if not _one_shared_linear(heads):
        return None
    task = row_tasks(sizes, joined.device)
    weight, bias = _stacked(heads)  # [T, k, d], [T, k]
    last = heads[0].shared[1]
    out = nn.functional.linear(joined, last.weight, last.bias) + torch.einsum("nd,nkd->nk", joined, weight[task].to(joined.dtype))
    return out + bias[task]


def stacked_outputs(heads: list[nn.Module], features: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """`stacked_output` of each task's own rows, one output per task."""
    if not _one_shared_linear(heads):
        return None
    sizes = [len(f) for f in features]
    return list(stacked_output(heads, torch.cat(features), sizes).split(sizes))


def stacked_penalties(heads: list[nn.Module]) -> torch.Tensor:
    """Each `OffsetHead`'s `penalty` (0 where it has none), as one [T] tensor."""
    weight, bias = _stacked(heads)
    found = _bank_rows(heads)
    if found is None:
        scale = torch.stack([h.lam for h in heads]) / torch.tensor([h.rows for h in heads], dtype=torch.float64)
    else:  # the bank holds every head's lam and rows
        bank, rows = found
        scale = bank.lam / bank.train_rows if rows is None else (bank.lam / bank.train_rows)[rows]
    scale = scale.to(weight)
    return scale * (weight.pow(2).flatten(1).sum(1) + bias.pow(2).sum(1))


def _loo_errors(u: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Sum of squared leave-one-out residuals of ridge regression of r on a design with SVD
    (u, s), for every lambda of `LAMBDAS` (the hat matrix's diagonal gives them in closed form);
    batched: u [B, n, k], s [B, k], r [B, n] -> [B, L] (a zero row of padding adds nothing)."""
    shrink = s.unsqueeze(1) ** 2 / (s.unsqueeze(1) ** 2 + LAMBDAS[:, None].to(s))  # [B, L, k]
    fitted = (shrink * (u.transpose(1, 2) @ r.unsqueeze(-1)).transpose(1, 2)) @ u.transpose(1, 2)  # [B, L, n]
    leverage = (u**2) @ shrink.transpose(1, 2)  # [B, n, L]
    return (((r.unsqueeze(1) - fitted) / (1 - leverage.transpose(1, 2)).clamp_min(1e-9)) ** 2).sum(-1)


@dataclass(frozen=True)
class Bucket:
    """Tasks' last-layer problems stacked for batched solves: their positions in the problem order,
    designs [B, n, d] and residuals [B, n], padded with zero rows to the bucket's largest task (a
    zero row changes no X^T X, X^T r or leave-one-out error)."""

    index: list[int]
    x: torch.Tensor
    r: torch.Tensor


@dataclass(frozen=True)
class Problems:
    """Tasks' last-layer problems (`OffsetHead.last_layer_problem`), every task's rows joined on
    the CPU in float64: designs [N, d] and residuals [N], `sizes[i]` rows for `heads[i]`."""

    heads: list[OffsetHead]
    design: torch.Tensor
    residual: torch.Tensor
    sizes: list[int]


def buckets(problems: Problems) -> list[Bucket]:
    """The problems in buckets whose largest task has at most twice the rows of its smallest: a
    thousand tiny tasks are one batched solve, not a thousand, and no small task is padded to a
    large one's rows. Each bucket is filled by one indexed copy, not a copy a task."""
    sizes = torch.tensor(problems.sizes, dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    order = sorted(range(len(sizes)), key=problems.sizes.__getitem__)
    out, start = [], 0
    while start < len(order):
        end, smallest = start, max(problems.sizes[order[start]], 1)
        while end < len(order) and problems.sizes[order[end]] <= 2 * smallest:
            end += 1
        index = order[start:end]
        counts = sizes[index]
        task, row = row_tasks(counts.tolist()), row_places(counts)
        source = torch.repeat_interleave(starts[index], counts) + row
        x = torch.zeros(len(index), int(counts.max()), problems.design.shape[1], dtype=torch.float64)
        r = torch.zeros(len(index), int(counts.max()), dtype=torch.float64)
        x[task, row], r[task, row] = problems.design[source], problems.residual[source]
        out.append(Bucket(index, x, r))
        start = end
    return out


def _set_solutions(heads: list[OffsetHead], solutions: torch.Tensor, lam: float, precision: torch.Tensor) -> None:
    """Every head's last-layer offsets, lambda and precision per input, in a few foreach copies
    rather than four calls a head (a thousand heads an epoch)."""
    if not heads:
        return
    weights = solutions[:, :-1].to(heads[0].offsets[-2]).view(len(heads), *heads[0].offsets[-2].shape)
    biases = solutions[:, -1:].to(heads[0].offsets[-1])
    found = _bank_rows(heads)
    if found is not None:  # their rows of the bank, one copy each
        bank, rows = found
        rows = slice(None) if rows is None else rows
        with torch.no_grad():
            bank.weight[rows], bank.bias[rows] = weights, biases
    else:
        torch._foreach_copy_([h.offsets[-2] for h in heads], list(weights.unbind(0)))
        torch._foreach_copy_([h.offsets[-1] for h in heads], list(biases.unbind(0)))
    torch._foreach_copy_([h.precision for h in heads], [precision.to(heads[0].precision)] * len(heads))
    torch._foreach_copy_([h.lam for h in heads], [torch.tensor(lam, dtype=torch.float64)] * len(heads))


def solve_offsets(head: OffsetHead, features: torch.Tensor, target: torch.Tensor) -> None:
    """The head's last-layer offsets solved on `features` and `target` with its saved penalty per
    input (`precision`): how a new group is fitted from its labelled rows."""
    x, r = head.last_layer_problem(features, target)
    p = head.precision.to(x)
    head.set_last_offsets(torch.linalg.solve(x.T @ x + torch.diag(p), x.T @ r))


def summed_cpu(values: torch.Tensor, world: int, device: torch.device | None) -> torch.Tensor:
    """`values` summed over ranks (on `device`, the process group's), back on the CPU."""
    return summed(values, world, device).cpu()


@dataclass(frozen=True)
class SharedLast:
    """The shared regression head's last layer as `em` sees it: the layer (every rank holds it,
    tasks or not), how many of its trailing inputs are the model's own inputs (handed on by
    `model.trunk.passthrough`; the inputs before them are learned features), and the variances
    EM ended at, which the next epoch's EM starts from (`WARM_STEPS`; equal on every rank)."""

    linear: nn.Linear
    inputs: int = 0
    state: dict = field(default_factory=dict)

    @property
    def warm(self) -> bool:
        """Whether an earlier epoch's EM left its state to go on from (a checkpoint from before
        the state held the noise and lambda resumes cold, once)."""
        return "sigma2" in self.state


ZERO_EIGEN = 1e-12  # eigenvalues of X_L X_L^T below this share of a task's largest are its rank's zeros


def _in_rows_space(bucket: Bucket, width: int) -> bool:
    """Whether a bucket's tasks have fewer rows than offsets, so EM solves them in the rows' space
    (`RowSpace`) rather than by a width x width Cholesky a task."""
    return bucket.x.shape[1] < width


@dataclass(frozen=True)
class RowSpace:
    """A bucket of tasks with fewer rows than offsets, set up once an epoch for many EM steps.

    Each task's design is [X_L, X_I]: the learned features, which EM gives one prior precision p
    (they are one block), and a handful of columns with their own (the inputs and the bias). With
    the eigenvectors Q of the n x n matrix X_L X_L^T (eigenvalues e), found once, every step's
    solve of A = X^T X + diag(prior) is products of n-vectors and n x k matrices: the learned block
    by (X_L^T X_L + p)^-1 X_L^T = X_L^T Q (e + p)^-1 Q^T, the other columns by their k x k Schur
    complement D_I + Y^T diag(p / (e + p)) Y (Y = Q^T X_I). No term is subtracted from a larger
    one, so small precisions lose nothing (the Woodbury form's subtraction did, and it cost 28 ms
    a step for a thousand tasks)."""

    index: list[int]
    eigen: torch.Tensor  # [B, n], the rank's zeros exactly 0
    zt: torch.Tensor  # (Q^T X_L)^T [B, split, n], contiguous: its products are most of a step
    y: torch.Tensor  # Q^T X_I [B, n, k]
    r: torch.Tensor  # Q^T r [B, n]

    @classmethod
    def of(cls, bucket: Bucket, split: int) -> "RowSpace":
        """`split`: how many leading columns are the learned block."""
        block = bucket.x[..., :split]
        eigen, q = torch.linalg.eigh(block @ block.transpose(1, 2))
        eigen = torch.where(eigen > ZERO_EIGEN * eigen.amax(-1, keepdim=True).clamp_min(1e-300), eigen, 0.0)
        qt = q.transpose(1, 2)
        zt = (block.transpose(1, 2) @ q).contiguous()
        return cls(bucket.index, eigen, zt, qt @ bucket.x[..., split:], (qt @ bucket.r.unsqueeze(-1)).squeeze(-1))

    def solve(self, prior: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each task's (offsets A^-1 X^T (r - X shift), diag A^-1 with the learned block's entries
        at their mean (EM reads only their sum), X^T of the residual the offsets leave, its sum of
        squares), for `prior` the diagonal of A - X^T X (one value over the learned block)."""
        split, p = self.zt.shape[1], prior[0]
        rho = self.r - shift[:split] @ self.zt - self.y @ shift[split:]  # Q^T (r - X shift)
        kept = p / (self.eigen + p)  # per direction, the share of it the learned block's prior keeps
        yt = self.y.transpose(1, 2)
        factor = torch.linalg.cholesky(torch.diag(prior[split:]) + yt @ (kept.unsqueeze(-1) * self.y))
        v_rest = torch.cholesky_solve(yt @ (kept * rho).unsqueeze(-1), factor).squeeze(-1)
        within = rho - (self.y @ v_rest.unsqueeze(-1)).squeeze(-1)  # what the learned block may explain
        v_block = (self.zt @ (within / (self.eigen + p)).unsqueeze(-1)).squeeze(-1)
        left = kept * within  # Q^T of the residual
        rest_inverse = torch.cholesky_inverse(factor)
        spill = yt @ ((self.eigen / (self.eigen + p) ** 2).unsqueeze(-1) * self.y)
        block_trace = (split - rho.shape[1] + kept.sum(1)) / p + (rest_inverse * spill).sum((1, 2))
        spread = torch.cat([(block_trace / split).unsqueeze(-1).expand(-1, split),
                            torch.diagonal(rest_inverse, dim1=1, dim2=2)], 1)
        back = torch.cat([self.zt @ left.unsqueeze(-1), yt @ left.unsqueeze(-1)], 1).squeeze(-1)
        return torch.cat([v_block, v_rest], 1), spread, back, left.pow(2).sum(1)


def _em(problems: Problems, stacked: list[Bucket], lam: float, world: int, device: torch.device | None, last: SharedLast,
        complete: bool) -> None:
    """`head_penalty: em` (see the module's docstring): every rank runs the same EM_STEPS on its
    tasks' sufficient statistics, summing 3d + 1 numbers over ranks per step.

    The last layer is a linear mixed model over its inputs. Its fixed effects are the shared
    layer, solved in the same EM rather than left where the epoch's gradient steps brought it
    (early stopping keeps an early epoch, whose shared layer is still far from its optimum, and
    EM would put what it lacks into the offsets as if tasks differed). The learned features are
    one block: one prior variance for their shared weights (a ridge learned from the data, as
    for the offsets) and one for their offsets, so that on data a linear model explains, they
    are shrunk away rather than fitted to noise (measured: an unpenalised block of 50 random
    features cost 2-12% test MSE on the `multilevel` suites). The inputs and the bias have their
    own offset variances and unpenalised shared weights, as a mixed model's fixed effects.
    Variances are updated by MacKay's fixed point (var = sum v^2 / sum gamma, gamma the share of
    each offset the data determine), which goes to zero on a useless column much faster than
    plain EM. The shared layer is solved only when every rank's problems are all its regression
    tasks (`complete`): a task left out (streamed, or too large to refit) also reads it."""
    width = last.linear.in_features + 1
    learned = torch.arange(width) < width - 1 - last.inputs  # the block of learned features
    heads = problems.heads
    gram = torch.zeros(len(heads), width, width, dtype=torch.float64)
    b0, rr0 = torch.zeros(len(heads), width, dtype=torch.float64), torch.zeros(len(heads), dtype=torch.float64)
    for bucket in stacked:  # each task's X^T X, X^T r and r^T r, a bucket at a time
        gram[bucket.index] = bucket.x.transpose(1, 2) @ bucket.x
        b0[bucket.index] = (bucket.x.transpose(1, 2) @ bucket.r.unsqueeze(-1)).squeeze(-1)
        rr0[bucket.index] = bucket.r.pow(2).sum(1)
    counts = torch.tensor([sum(problems.sizes), len(heads), float(not complete), rr0.sum()],
                          dtype=torch.float64)
    rows, tasks, incomplete, scatter = summed_cpu(counts, world, device)
    total_gram = summed_cpu(gram.sum(0), world, device)
    fixed = not incomplete and tasks > 0
    ridge = torch.eye(width, dtype=torch.float64) * (1e-8 * float(torch.diagonal(total_gram).mean()) + 1e-12)
    w0 = torch.cat([last.linear.weight.detach().reshape(-1), last.linear.bias.detach()]).double().cpu()
    shift = torch.zeros(width, dtype=torch.float64)  # the shared layer's step: w0 + shift are the fixed effects
    eye = torch.eye(width, dtype=torch.float64)
    spaces = [RowSpace.of(bucket, int(learned.sum())) if _in_rows_space(bucket, width) else None for bucket in stacked]
    floor = 1e-8 * float(torch.diagonal(total_gram).mean()) / max(float(tasks), 1.0) + 1e-12  # keeps Cholesky's PD

    def residuals(v: torch.Tensor, index: list[int] | slice = slice(None)) -> torch.Tensor:
        """Tasks' residual sums of squares with the shared layer moved by `shift` and offsets v."""
        w = v + shift
        return rr0[index] - 2 * (w * b0[index]).sum(1) + ((gram[index] @ w.unsqueeze(-1)).squeeze(-1) * w).sum(1)

    def posterior(var: torch.Tensor, sigma2: float) -> tuple[torch.Tensor, ...]:
        """(each task's offsets, the diagonal of their posterior covariance / sigma2, X^T of what
        they leave, its sum of squares), bucket by bucket: with fewer rows a task than offsets
        in the rows' space (`RowSpace`), else by Cholesky and a triangular inverse, which is all
        the diagonal needs (twice as fast as inverting)."""
        prior = (sigma2 / var).clamp_min(floor)
        v, spread, left = torch.empty_like(b0), torch.empty_like(b0), torch.empty_like(b0)
        rss = torch.empty_like(rr0)
        for bucket, space in zip(stacked, spaces):
            i = bucket.index
            if space is not None:
                v[i], spread[i], left[i], rss[i] = space.solve(prior, shift)
                continue
            b = b0[i] - gram[i] @ shift
            factor = torch.linalg.cholesky(gram[i] + torch.diag(prior))
            lower_inverse = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
            v[i] = (lower_inverse.transpose(1, 2) @ (lower_inverse @ b.unsqueeze(-1))).squeeze(-1)
            spread[i] = lower_inverse.pow(2).sum(1)
            left[i] = b - (gram[i] @ v[i].unsqueeze(-1)).squeeze(-1)
            rss[i] = residuals(v[i], i)
        return v, spread, left, rss

    def pooled(values: torch.Tensor) -> torch.Tensor:
        return torch.where(learned, values[learned].sum(), values)

    def fixed_effects(left: torch.Tensor, sigma2: float, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the shared layer's step given what the offsets leave, summed over tasks: X^T (y - X (w + v)),
        the inverse of its penalised Gram matrix)."""
        penalty = torch.where(learned, sigma2 / max(prior, 1e-12), 0.0)
        inverse = torch.linalg.inv(total_gram + ridge + torch.diag(penalty))
        return inverse @ (left + total_gram @ (w0 + shift)) - w0, inverse

    if last.warm:  # from where the last epoch's EM ended
        var, prior, sigma2 = last.state["var"], last.state["prior"], last.state["sigma2"]
    else:  # cold: complete pooling, so that the offsets start from what tasks do not share, then a ridge
        prior = float(scatter / rows)  # the learned block's fixed-effect variance: at first, the residual's
        if fixed:
            shift, _ = fixed_effects(summed_cpu(b0.sum(0), world, device), prior, prior)
        v = torch.linalg.solve(gram + lam * torch.eye(width, dtype=torch.float64), b0 - gram @ shift) if heads else b0
        sigma2 = float(summed_cpu(residuals(v).sum().view(1), world, device)[0]) / float(rows)
        var = torch.full((width,), sigma2 / lam, dtype=torch.float64)
    for _ in range(WARM_STEPS if last.warm else EM_STEPS):
        v, spread, left, rss = posterior(var, sigma2)
        shrunk = spread * sigma2 / var  # per offset, the share of it the prior decides
        determined = (1 - shrunk).clamp(1e-9, 1).sum(0)
        noise = (rss + sigma2 * (width - shrunk.sum(1))).sum()  # sigma2 trace(A^-1 X^T X), A = X^T X + D
        total = summed_cpu(torch.cat([(v**2).sum(0), determined, noise.view(1), left.sum(0)]), world, device)
        var = pooled(total[:width]) / pooled(total[width : 2 * width]).clamp_min(1e-9) + 1e-12
        sigma2 = float(total[2 * width]) / float(rows)
        if fixed:
            shift, inverse_fixed = fixed_effects(total[2 * width + 1 :], sigma2, prior)
            if learned.any():
                w = (w0 + shift)[learned]
                share = (1 - torch.diagonal(inverse_fixed)[learned] * sigma2 / max(prior, 1e-12)).clamp(1e-9, 1)
                prior = float((w**2).sum() / share.sum()) + 1e-12
    v = posterior(var, sigma2)[0]
    last.state.update(var=var, prior=prior, sigma2=sigma2, lam=lam)
    with torch.no_grad():
        last.linear.weight.add_(shift[:-1].to(last.linear.weight).view_as(last.linear.weight))
        last.linear.bias.add_(shift[-1:].to(last.linear.bias))
    _set_solutions(heads, v, lam, sigma2 / var)


def _last_layer_problems(problems: dict) -> Problems:
    """`OffsetHead.last_layer_problem` of every task in `problems` (task -> (head, features,
    target)); heads that read the shared last layer directly (no `model.head_hidden`) take all
    tasks' rows through it at once."""
    heads = [head for head, _, _ in problems.values()]
    sizes = [len(y) for _, _, y in problems.values()]
    if not heads:
        return Problems([], torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [])
    if not _one_shared_linear(heads):
        parts = [head.last_layer_problem(f, y) for head, f, y in problems.values()]
        return Problems(heads, torch.cat([x for x, _ in parts]).cpu(), torch.cat([r for _, r in parts]).cpu(), sizes)
    joined = torch.cat([f for _, f, _ in problems.values()])
    residual = (torch.cat([y for _, _, y in problems.values()]) - heads[0].shared[1](joined).squeeze(-1)).double()
    design = torch.cat([joined, torch.ones(len(joined), 1, dtype=joined.dtype, device=joined.device)], 1).double()
    return Problems(heads, design.cpu(), residual.cpu(), sizes)


@torch.no_grad()
def refit(problems: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]], penalty: float | str, world: int,
          device: torch.device | None = None, last: SharedLast | None = None, complete: bool = True) -> float | None:
    """Solves every owned regression task's last-layer offsets exactly (see the module's
    docstring). `problems`: task -> (its OffsetHead, train features, train target on the model's
    scale). Every rank calls it each epoch (with `auto`, one all-reduce of L floats on `device`,
    the process group's: NCCL reduces GPU tensors only); returns the lambda used (None: `auto`
    and no rank had a task to solve, so there was nothing to learn it from). `em` needs `last`
    and `complete`: whether `problems` holds every regression task of this rank."""
    solvable = _last_layer_problems({n: p for n, p in problems.items()
                                     if len(p[0].offsets) and p[0].shared[1].out_features == 1})
    width = solvable.design.shape[1]
    stacked = buckets(solvable)
    if penalty == "em" and last is not None and last.warm:  # warm EM needs no ridge to start from
        lam = last.state["lam"]
    elif penalty in ("auto", "em"):
        errors = torch.zeros(len(LAMBDAS), dtype=torch.float64)
        for bucket in stacked:
            errors += _loo_errors(*_spectrum(bucket.x), bucket.r).sum(0).cpu()
        errors = summed_cpu(errors, world, device)
        if not errors.any():
            return None
        lam = float(LAMBDAS[int(errors.argmin())])
    else:
        lam = float(penalty)
    if penalty == "em" and last is not None:
        _em(solvable, stacked, lam, world, device, last, complete)
        return lam
    for bucket in stacked:
        xt = bucket.x.transpose(1, 2)
        solutions = torch.linalg.solve(xt @ bucket.x + lam * torch.eye(width, dtype=torch.float64),
                                       (xt @ bucket.r.unsqueeze(-1)).squeeze(-1))
        _set_solutions([solvable.heads[i] for i in bucket.index], solutions, lam, torch.full((width,), lam))
    return lam


def _spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, singular values) of each design in `x` [B, n, d], what leave-one-out needs: with fewer
    rows than columns from the eigenvectors of X X^T (n x n; measured: 68 ms for 1,000 tasks of
    28 x 57, an SVD 158), else by SVD."""
    if x.shape[1] < x.shape[2]:
        values, vectors = torch.linalg.eigh(x @ x.transpose(1, 2))
        return vectors, values.clamp_min(0).sqrt()
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u, s


def task_head(out_width: int, cfg: ModelConfig, trunk_out: int, shared: nn.Module | None, rows: int) -> nn.Module:
    return OffsetHead(shared, cfg.head_penalty, rows)
