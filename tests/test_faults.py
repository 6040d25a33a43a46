"""The fault-injection spec and the non-finite loss guard, in one process."""

import time

import pytest
import torch

from distributed_mtml.faults import SLOW_STEP_S, FaultInjector, FiniteLossGuard, NonFiniteLoss, parse_fault


def test_fault_spec_parses_and_bad_specs_name_the_variable():
    assert parse_fault("sigkill@2:5:1") == ("sigkill", 2, 5, 1)
    assert parse_fault("exit@0:7") == ("exit", 0, 7, None)
    for bad in ("boom@1:2", "exit@1", "exit@a:b", "exit1:2"):
        with pytest.raises(ValueError, match="MTML_FAULT="):
            parse_fault(bad)


def test_nan_fault_poisons_only_the_first_task_at_its_step_and_never_after_a_restore(monkeypatch):
    monkeypatch.setenv("MTML_FAULT", "nan@1:2")
    batch = {"a": (torch.ones(2, 3), torch.zeros(2)), "b": (torch.ones(2, 3), torch.zeros(2))}
    fresh = FaultInjector(rank=0, restored=False)
    assert fresh.strike(1, 1, batch) is batch
    poisoned = fresh.strike(1, 2, batch)
    assert poisoned["a"][0].isnan().all() and not poisoned["b"][0].isnan().any()
    assert FaultInjector(rank=0, restored=True).strike(1, 2, batch) is batch


def test_slow_fault_delays_every_step_from_its_own_while_the_group_is_degraded(monkeypatch):
    monkeypatch.setenv("MTML_FAULT", "slow@1:2:0")
    for restored in (False, True):
        slow = FaultInjector(rank=0, restored=restored, degraded=True)
        took = []
        for epoch, step in [(0, 9), (1, 1), (1, 2), (1, 3), (2, 0)]:
            start = time.perf_counter()
            assert slow.strike(epoch, step, None) is None
            took.append(time.perf_counter() - start)
        assert max(took[:2]) < SLOW_STEP_S / 2 and min(took[2:]) >= SLOW_STEP_S
    assert FaultInjector(rank=0, restored=True, degraded=False).at is None  # grown back: full speed
    assert FaultInjector(rank=1, restored=False, degraded=True).at is None


def test_guard_names_the_first_diverged_task_and_step():
    guard = FiniteLossGuard(["a", "b", "c"], ["c", "b"], torch.device("cpu"))  # it owns c and b, in that order
    guard.observe(torch.tensor([1.0, 2.0]), 0)
    guard.raise_if_diverged(1, str)  # all finite: no error
    guard.observe(torch.tensor([float("inf"), 1.0]), 4)
    guard.observe(torch.tensor([float("nan"), float("nan")]), 2)
    guard.observe(torch.tensor([float("nan"), float("nan")]), 5)
    with pytest.raises(NonFiniteLoss, match="task 'b' at epoch 7, step 2"):
        guard.raise_if_diverged(1, lambda step: f"epoch 7, step {step}")
    guard = FiniteLossGuard(["a"], ["a"], torch.device("cpu"))
    guard.observe(torch.tensor([float("nan")]), 0)
    with pytest.raises(NonFiniteLoss):
        guard.raise_if_diverged(1, str)
    with pytest.raises(NonFiniteLoss):  # a caught error does not clear it: the run must not go on
        guard.raise_if_diverged(1, str)
