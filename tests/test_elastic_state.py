"""What lets an elastic run change its worker count: checkpoints keyed by task, and meta-batches
that do not depend on how many workers draw them (no Ray here; the cluster tests are in
test_elastic.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from distributed_mtml.aggregation import METHODS, loss_weighting
from distributed_mtml.config import validate_config
from distributed_mtml.heads.offset_bank import BankRow, bind_offsets
from distributed_mtml.models import TaskShape, build_shared_heads, build_task_modules, build_trunk
from distributed_mtml.runtime.placement import place_tasks
from distributed_mtml.runtime.worker import make_optimizer
from distributed_mtml.train.checkpoint import (
    optimised_parameters,
    parameter_groups,
    restore_worker_state,
    save_worker_state,
)

SHAPES = [TaskShape(f"t{i}", "regression", 4) for i in range(3)]
NAMES = [s.name for s in SHAPES]


def _rank(cfg, owned: list[str], bound: bool = False):
    """One rank's parts as the worker builds them: trunk, the shared head parts (the default
    heads share one), its tasks' modules (`bound`: their offsets in one bank, as a worker has
    them), UW, Adam."""
    torch.manual_seed(0)
    trunk = build_trunk(cfg.model, SHAPES)
    shared = build_shared_heads(cfg.model, SHAPES, 0)
    modules = build_task_modules(cfg.model, SHAPES, 0, only=owned, shared=shared)
    if bound:
        bind_offsets(modules)
    weighting = loss_weighting(METHODS["uw"], owned, NAMES, {}, {n: "regression" for n in NAMES})
    groups = parameter_groups(trunk, modules, weighting, shared)
    optimizer = make_optimizer("adam", optimised_parameters(groups), 1e-2, 0.0)
    return trunk, shared, modules, weighting, optimizer


def _train(parts, steps: int, seed: int) -> None:
    trunk, _, modules, weighting, optimizer = parts
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        losses = [((modules[n].head(trunk(modules[n].adapter(torch.randn(8, 4, generator=g))))) ** 2).mean()
                  for n in modules]
        optimizer.zero_grad()
        weighting.total(losses).backward()
        optimizer.step()


def _state_by_parameter(parts) -> dict[str, dict]:
    """Each task's (and the trunk's) parameters with their Adam state, by a name that does not
    depend on the rank: what must survive a change of worker count (a task's offsets in a bank:
    its rows of the bank's values and moments)."""
    trunk, shared, modules, weighting, optimizer = parts
    out = {}
    for key, entries in parameter_groups(trunk, modules, weighting, shared).items():
        for i, entry in enumerate(entries):
            p, row = (entry.param, entry.index) if isinstance(entry, BankRow) else (entry, None)
            cut = (lambda v: v) if row is None else (lambda v, r=row, p=p: v[r] if v.shape == p.shape else v)  # noqa: E731
            out[f"{key}.{i}"] = {"value": cut(p.detach()).clone(), **{k: cut(v).clone() for k, v in optimizer.state[p].items()}}
    return out


@pytest.mark.parametrize("saved_bound,restored_bound", [(False, False), (True, False), (True, True), (False, True)])
def test_a_checkpoint_of_two_ranks_restores_into_one_rank_holding_every_task(tmp_path, saved_bound, restored_bound):
    """Saved by ranks [[t0, t2], [t1]], restored by one rank with all three tasks: every task's
    head, loss weight and Adam moments, and the trunk's, come back as they were, and the heads'
    refit state (rank 0's: every rank holds the same). Offsets held in a bank (`offset_bank`,
    as a worker holds them) or not, on either side: the files are the same."""
    cfg = validate_config({"model": {"trunk": {"widths": [8]}}})
    placement = place_tasks(NAMES, 2)
    ranks = [_rank(cfg, owned, saved_bound) for owned in placement]
    for r, parts in enumerate(ranks):
        _train(parts, steps=3, seed=r)
    ranks[1][0].load_state_dict(ranks[0][0].state_dict())  # DDP keeps the trunks equal
    ranks[1][1].load_state_dict(ranks[0][1].state_dict())  # and the shared heads (their gradients are summed)
    for r, (trunk, shared, modules, weighting, optimizer) in enumerate(ranks):
        save_worker_state(str(tmp_path), r, 4, "{}", trunk, modules, optimizer, weighting, shared=shared,
                          refit={"var": torch.arange(3.0, dtype=torch.float64), "prior": 0.5})

    alone = _rank(cfg, NAMES, restored_bound)
    trunk, shared, modules, weighting, optimizer = alone
    next_epoch, _, refit = restore_worker_state(str(tmp_path), trunk, modules, optimizer, weighting, shared)
    assert next_epoch == 5
    assert torch.equal(refit["var"], torch.arange(3.0, dtype=torch.float64)) and refit["prior"] == 0.5
    saved = {**_state_by_parameter(ranks[1]), **_state_by_parameter(ranks[0])}  # the trunk's: rank 0's
    restored = _state_by_parameter(alone)
    assert set(restored) == set(saved)
    for name, state in saved.items():
        assert set(restored[name]) == set(state), name
        for k, v in state.items():
            assert torch.equal(restored[name][k], v), (name, k)


REPLICATED = [n for n, m in METHODS.items() if m.state and n != "uw"]  # UW's state is per task


SHARED = torch.nn.Parameter(torch.ones(2, 2))  # the trunk's last weight matrix, for GradNorm and DB-MTL


def _step(method: str, weighting, losses: list[torch.Tensor], step: int) -> None:
    """One step's use of the weighting's state: a loss weighting's total (each loss reading
    SHARED), a Gram method's weights (on a Gram made from the step's losses, the same on every
    rank)."""
    weighting.total([loss * SHARED.mean() for loss in losses])
    if METHODS[method].kind == "gram":
        j = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        j[1] = -0.5 * j[0] + 0.2 * j[1]  # a conflict, so targets move
        METHODS[method].weights(j @ j.T, seed=step, **weighting.gram_options())


@pytest.mark.parametrize("method", REPLICATED)
def test_a_stateful_weighting_goes_on_after_a_checkpoint_by_another_placement(tmp_path, method):
    """DWA's history, RLW's step count, STCH's nadir point, FAMO's logits and moments, GradVac's
    target cosines: the same on every rank (each reads every task's losses, or the same Gram),
    saved by rank 0 of [[t0, t2], [t1]] and restored into one rank holding all three tasks, which
    then weighs the next step as a run that never stopped."""
    cfg = validate_config({"model": {"trunk": {"widths": [8]}}, "aggregation": {"method": method}})
    step_losses = lambda step: [0.9 ** (step * (i + 1)) + 0.1 * i for i in range(3)]  # noqa: E731
    options = {"stch_warmup": 1} if method == "stch" else {}  # its nadir point is measured after 2 epochs
    gathered = []  # every suite-wide vector the one process read, which each rank's all-reduce would give

    def record(values):
        gathered.append(values)
        return values

    def replay():  # a rank's gather: the same vectors, in the order it asks for them
        cursor = itertools.count()
        return lambda _: gathered[next(cursor)]

    alone = loss_weighting(METHODS[method], NAMES, NAMES, options, gather=record, seed=2, shared=SHARED)
    placement = [["t0", "t2"], ["t1"]]
    ranks = [loss_weighting(METHODS[method], owned, NAMES, options, gather=replay(), seed=2,
                            shared=SHARED) for owned in placement]
    for step in range(7):
        _step(method, alone, [torch.tensor(v) for v in step_losses(step)], step)
        for owned, weighting in zip(placement, ranks):
            _step(method, weighting, [torch.tensor(step_losses(step)[NAMES.index(n)]) for n in owned], step)
        if step % 2:
            for w in (alone, *ranks):
                w.end_epoch(torch.tensor(step_losses(step), dtype=torch.float64) * 0.5)
    for r, (owned, weighting) in enumerate(zip(placement, ranks)):
        trunk, shared, modules, _, optimizer = _rank(cfg, owned)
        save_worker_state(str(tmp_path), r, 3, "{}", trunk, modules, optimizer, weighting, shared=shared)
    trunk, shared, modules, _, _ = _rank(cfg, NAMES)
    restored = loss_weighting(METHODS[method], NAMES, NAMES, options, seed=2, shared=SHARED)
    groups = parameter_groups(trunk, modules, restored, shared)
    optimizer = make_optimizer("adam", optimised_parameters(groups), 1e-2, 0.0)
    restore_worker_state(str(tmp_path), trunk, modules, optimizer, restored, shared)
    nxt = [torch.tensor(v) for v in step_losses(7)]
    nxt = [v * SHARED.mean() for v in nxt]
    assert torch.equal(restored.total(nxt), alone.total(nxt)) and torch.equal(restored.multipliers(), alone.multipliers())
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), alone.state_dict().values()))
    fresh = loss_weighting(METHODS[method], NAMES, NAMES, options, seed=2, shared=SHARED).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in alone.state_dict().items())  # the state had moved


def test_a_meta_batch_is_the_same_episodes_whatever_the_worker_count():
    """The union over ranks of their episodes (index, task, rows) is one set for 1, 2 and 3
    workers, for a family and for a suite, in training and validation streams alike."""
    from distributed_mtml.meta.plan import MetaPlan
    from distributed_mtml.meta.tasks import SinusoidFamily, SuiteEpisodes, draw

    cfg = validate_config({"meta": {"meta_batch_size": 6}})
    g = torch.Generator().manual_seed(1)
    rows = {f"t{i}": (torch.randn(40, 2, generator=g), torch.randn(40, generator=g)) for i in range(4)}
    for source, plan in [
        (SinusoidFamily(5, 5), MetaPlan(config=cfg, source="family", name="sinusoid", task={})),
        (None, MetaPlan(config=cfg, source="suite", name="s", task={}, suite_tasks=list(rows))),
    ]:
        batches = []
        for world in (1, 2, 3):
            found = {}
            for rank in range(world):
                items = plan.episodes_of(rank, world, 6, first=7 * 6)
                owned = plan.shards(world)[rank]
                own = source or SuiteEpisodes({n: rows[n] for n in owned}, 5, 5)
                episodes = draw(own, 0, 7, items)
                for k, (j, task) in enumerate(items):
                    found[j] = (task, episodes.xs[k], episodes.yq[k])
            batches.append(found)
        assert sorted(batches[0]) == list(range(6))
        for other in batches[1:]:
            assert sorted(other) == sorted(batches[0])
            for j, (task, xs, yq) in batches[0].items():
                assert other[j][0] == task and torch.equal(other[j][1], xs) and torch.equal(other[j][2], yq)


def test_many_tasks_states_are_stacked_in_a_file_and_come_back_as_they_were(tmp_path):
    """A rank's tasks' states of one structure are saved as one tensor per leaf ([T, ...]); a
    file of states that differ keeps each; both load back (weights_only) exactly."""
    from distributed_mtml.runtime.checkpoint import load_file, packed, unpacked

    same = {f"t{i}": {"head": {"w": torch.randn(2, 3), "b": torch.randn(2)}, "steps": [torch.tensor(float(i)), i]}
            for i in range(50)}
    odd = [{"a": {"w": torch.randn(2)}, "b": {"w": torch.randn(3)}},  # shapes, keys, dtypes, nesting, types differ
           {"a": {"w": torch.randn(2)}, "b": {"v": torch.randn(2)}},
           {"a": {"w": torch.randn(2)}, "b": {"w": torch.randn(2, dtype=torch.float64)}},
           {"a": {"w": [torch.randn(2)]}, "b": {"w": {"0": torch.randn(2)}}},
           {"a": {"w": torch.randn(2), "n": 1}, "b": {"w": torch.randn(2), "n": 1.0}}]
    for states, stacked in ((same, True), *((o, False) for o in odd)):
        torch.save(packed(states), tmp_path / "f.pt")
        saved = load_file(str(tmp_path / "f.pt"))
        assert ("stacked" in saved) == stacked
        if stacked:
            assert saved["stacked"]["/head/w"].shape == (50, 2, 3)
        back = unpacked(saved)
        assert list(back) == list(states)
        for name, state in states.items():
            torch.testing.assert_close(back[name], state)
