"""Failures inside a training worker: rehearsing them, and catching a diverging loss.

`MTML_FAULT=<kind>@<epoch>:<step>[:<rank>]` in the driver's environment makes one worker die
at that step, so that a user (and our tests) can watch recovery happen on a real cluster:
`sigkill` (what the OOM killer does), `exit` (a library calling `os._exit(1)`) or, in `mtml
train`, `nan` (the worker's first task gets a batch of NaN features, as from a corrupt shard).
It fires only in a worker that started without a checkpoint, so a restarted group runs through,
and a dying worker first waits DEATH_PAUSE_S, so that the last report's checkpoint is registered.
`slow` rehearses a degraded cluster instead: from that step on, while the group runs below its
largest size (a node lost), each step takes SLOW_STEP_S longer, restarted or not. However fast
the machine, the run then lasts until the group has grown back (or to its end), so that an
elastic group can be watched shrinking and growing back.

A non-finite loss stops the run: every rank notes the first step at which each of its tasks
went non-finite, without a device sync per step, and one all-reduce per epoch agrees on the
earliest, so all ranks raise the same error naming the task that diverged first.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import torch
import torch.distributed as dist

from distributed_mtml.segments import in_suite_order

FAULT_ENV = "MTML_FAULT"
KINDS = ("sigkill", "exit", "nan", "slow")
SLOW_STEP_S = 0.05
# A worker dies this long after its fault is due: a death right after a report could come before
# the controller registered that report's checkpoint, and the group would restart afresh (and the
# fault strike again). Measured: a kill 20 ms after a report lost its checkpoint, under load.
DEATH_PAUSE_S = 2.0


class NonFiniteLoss(RuntimeError):
    """A task's loss became NaN or infinite; the epoch is not checkpointed."""


def parse_fault(spec: str) -> tuple[str, int, int, int | None]:
    """'sigkill@2:5:1' -> ('sigkill', 2, 5, 1). Raises ValueError naming the variable."""
    try:
        kind, where = spec.split("@")
        numbers = [int(n) for n in where.split(":")]
        if kind not in KINDS or len(numbers) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <{'|'.join(KINDS)}>@<epoch>:<step>[:<rank>]") from None
    return kind, numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def fault_env() -> dict[str, str]:
    """What the driver forwards to its workers' runtime environment."""
    return {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}


class FaultInjector:
    """Strikes this worker at the configured step, once per fresh start."""

    def __init__(self, rank: int, restored: bool, degraded: bool = False):
        """`degraded`: the group is smaller than its largest size (only `slow` looks at it)."""
        spec = os.environ.get(FAULT_ENV)
        self.at = None
        if spec:
            kind, epoch, step, on_rank = parse_fault(spec)
            due = degraded if kind == "slow" else not restored
            if (on_rank is None or on_rank == rank) and due:
                self.kind, self.at = kind, (epoch, step)

    def strike(self, epoch: int, step: int, batch: dict | None = None) -> dict | None:
        """The batch to train on: the same one, unless the fault is due now."""
        if self.at is None:
            return batch
        if self.kind == "slow":
            if (epoch, step) >= self.at:
                time.sleep(SLOW_STEP_S)
            return batch
        if self.at != (epoch, step):
            return batch
        print(f"[mtml] {FAULT_ENV}: worker pid {os.getpid()} fails now ({self.kind})", flush=True)
        if self.kind == "nan":  # meta-training passes no batch: nothing to poison
            if not batch:
                return batch
            name, (x, y) = next(iter(batch.items()))
            return {**batch, name: (x * float("nan"), y)}
        time.sleep(DEATH_PAUSE_S)
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)


class FiniteLossGuard:
    """Remembers, per owned task, the first step of an epoch whose loss was not finite."""

    def __init__(self, order: list[str], owned: list[str], device: torch.device):
        self.order, self.owned = order, owned
        self.never = torch.iinfo(torch.int64).max
        self.first = torch.full((len(owned),), self.never, dtype=torch.int64, device=device)

    def observe(self, losses: torch.Tensor, step: int) -> None:
        """A step's losses of the owned tasks, in their order: three tensor operations a step
        whatever the task count (a thousand tasks are one comparison, not a thousand)."""
        torch.minimum(self.first, torch.where(torch.isfinite(losses.detach()), self.never, step), out=self.first)

    def raise_if_diverged(self, world: int, place: Callable[[int], str]) -> None:
        """Raises on every rank if any task of the suite diverged since the last call (`place`
        turns the step into words: 'epoch 3, step 17'); resets otherwise."""
        first = in_suite_order(self.first, self.owned, self.order, self.never)
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.min())
        if step != self.never:
            task = self.order[int(first.argmin())]
            raise NonFiniteLoss(
                f"non-finite loss in task '{task}' at {place(step)}: stopped before checkpointing it "
                "(lower the learning rate, or check the task's data)")
        self.first.fill_(self.never)
