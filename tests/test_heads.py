"""Sharing between many small related tasks: suite-pooled standardisation and the head kinds
(`heads/`), against closed forms, a single process, and separate heads."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from distributed_mtml.config import ModelConfig, TrunkConfig, validate_config
from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.prepare import plan_preprocessing
from distributed_mtml.data.scan import Moments, scan_task
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.data.validate import checked_scans
from distributed_mtml.errors import InputError
from distributed_mtml.heads import shared_plus_offset
from distributed_mtml.models import TaskShape, build_shared_heads, build_task_modules, build_trunk


def test_merged_moments_are_those_of_all_rows_at_once():
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=m, scale=s, size=(n, 3)) for m, s, n in ((1e4, 1, 7), (-3, 50, 120), (0, 1e-3, 1))]
    merged = Moments(3)
    for p in parts:
        one = Moments(3)
        one.add(p)
        merged.merge(one)
    rows = np.concatenate(parts)
    np.testing.assert_allclose(merged.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.std(), rows.std(0), rtol=1e-9)
    np.testing.assert_allclose(merged.column(1).std(), rows[:, 1:2].std(0), rtol=1e-9)


def _write(path, name, columns: dict, split: list[str]):
    pq.write_table(pa.table({**columns, "split": split}), f"{path}/{name}.parquet")


@pytest.fixture
def mixed_suite(tmp_path):
    """Tasks a and b read x1, x2 and target y; task c reads x1, x3 and target t; in very
    different units per task, so pooled and per-task statistics differ."""
    rng = np.random.default_rng(1)
    path = str(tmp_path)
    split = lambda n: ["train"] * (n - 4) + ["val", "val", "test", "test"]  # noqa: E731
    _write(path, "a", {"x1": rng.normal(10, 1, 20), "x2": rng.normal(0, 1, 20), "y": rng.normal(100, 5, 20)}, split(20))
    _write(path, "b", {"x1": rng.normal(-5, 3, 30), "x2": rng.normal(7, 2, 30), "y": rng.normal(0, 1, 30)}, split(30))
    _write(path, "c", {"x1": rng.normal(0, 1, 25), "x3": rng.normal(1e3, 10, 25), "t": rng.normal(3, 1, 25)}, split(25))
    with open(f"{path}/suite.yaml", "w") as f:
        f.write("name: mixed\ntasks:\n"
                "- {name: a, type: regression, path: a.parquet, target: y}\n"
                "- {name: b, type: regression, path: b.parquet, target: y}\n"
                "- {name: c, type: regression, path: c.parquet, target: t}\n")
    return path


def test_suite_statistics_pool_the_train_rows_of_every_task_reading_a_column(mixed_suite):
    spec, scans = checked_scans(mixed_suite)
    preps = plan_preprocessing(scans, "suite")
    data = {t.name: load_task(mixed_suite, t) for t in spec.tasks}
    column = lambda task, c: data[task].x["train"][:, data[task].features.index(c)].astype(np.float64)  # noqa: E731
    x1 = np.concatenate([column(t, "x1") for t in "abc"])
    x2 = np.concatenate([column(t, "x2") for t in "ab"])
    y = np.concatenate([data[t].y["train"] for t in "ab"]).astype(np.float64)
    for task in "ab":
        assert preps[task].feature_mean == pytest.approx([x1.mean(), x2.mean()], rel=1e-6)
        assert preps[task].feature_std == pytest.approx([x1.std(), x2.std()], rel=1e-5)
        assert (preps[task].target_mean, preps[task].target_std) == pytest.approx((y.mean(), y.std()), rel=1e-5)
    assert preps["c"].feature_mean == pytest.approx([x1.mean(), column("c", "x3").mean()], rel=1e-6)
    assert preps["c"].target_mean == pytest.approx(data["c"].y["train"].mean(), rel=1e-5)  # its own column: alone
    own = plan_preprocessing(scans, "task")
    assert own["a"].feature_mean == pytest.approx([column("a", "x1").mean(), column("a", "x2").mean()], rel=1e-6)
    assert plan_preprocessing(scans, "off")["a"].feature_mean is None
    streamed = {t.name: scan_task(mixed_suite, t, batch_rows=3) for t in spec.tasks}  # moments merged batch by batch
    for name, prep in plan_preprocessing(streamed, "suite").items():
        assert prep.feature_mean == pytest.approx(preps[name].feature_mean, rel=1e-9)
        assert prep.feature_std == pytest.approx(preps[name].feature_std, rel=1e-9)
        assert prep.target_std == pytest.approx(preps[name].target_std, rel=1e-9)


def test_a_group_level_feature_survives_suite_standardisation_and_not_per_task(tmp_path):
    make_suite("multilevel", str(tmp_path), {"groups": 6, "rows": 20, "group_features": 1})
    spec, scans = checked_scans(str(tmp_path))
    for mode, survives in (("suite", True), ("task", False)):
        preps = plan_preprocessing(scans, mode)
        seen = []
        for task in spec.tasks:
            data = load_task(str(tmp_path), task)
            z = preps[task.name].inputs(data.x["train"])[:, data.features.index("z1")]
            assert np.ptp(z) < 1e-5  # constant within a group either way
            seen.append(float(z[0]))
        assert (np.std(seen) > 0.3) == survives, (mode, seen)


def _features(seed: int, rows: int, width: int = 3) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def _offset_heads(penalty, tasks: int = 3, rows: int = 40, width: int = 3, noise: float = 0.1):
    cfg = ModelConfig(trunk=TrunkConfig(widths=[width], passthrough=False), heads="shared_plus_offset",
                      head_penalty=penalty)
    shapes = [TaskShape(f"t{i}", "regression", width) for i in range(tasks)]
    shared = build_shared_heads(cfg, shapes, 0)
    modules = build_task_modules(cfg, shapes, 0, shared=shared, rows={s.name: rows for s in shapes})
    data = {}
    for i, s in enumerate(shapes):
        f = _features(i, rows, width)
        deviation = (1 + i) if noise < 1 else 1 + 0.2 * i  # tasks far apart, or near each other in noise
        data[s.name] = (f, f @ torch.tensor([1.0, -2.0, 0.5]) * deviation + i + noise * _features(9 + i, rows, 1)[:, 0])
    return shared, modules, data


def _design(f: torch.Tensor) -> np.ndarray:
    return np.hstack([f.double().numpy(), np.ones((len(f), 1))])


def test_offsets_are_the_ridge_toward_the_shared_head_and_zero_penalty_gives_each_task_its_own_fit():
    """With penalty 0 every task's head is its own least-squares fit (separate heads' optimum);
    with penalty lambda, the ridge regression of the shared head's residual toward 0."""
    for lam in (0.0, 5.0):
        shared, modules, data = _offset_heads(lam)
        shared_plus_offset.refit({n: (m.head, *data[n]) for n, m in modules.items()}, lam, 1)
        for n, m in modules.items():
            f, y = data[n]
            x = _design(f)
            base = shared["regression:1"](f).squeeze(-1).detach().double().numpy()
            coef = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ (y.double().numpy() - base))
            got = m.head(f).squeeze(-1).detach().double().numpy()
            np.testing.assert_allclose(got, base + x @ coef, atol=1e-4)
            if lam == 0:
                own = np.linalg.lstsq(x, y.double().numpy(), rcond=None)[0]
                np.testing.assert_allclose(got, x @ own, atol=1e-4)


def test_an_infinite_penalty_leaves_one_shared_head_fitted_to_every_tasks_rows():
    shared, modules, data = _offset_heads(float("inf"))
    assert all(not list(m.parameters()) for m in modules.values())  # nothing of its own
    params = list(shared.parameters())
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = sum(((m.head(data[n][0]).squeeze(-1) - data[n][1]) ** 2).sum() for n, m in modules.items())
        loss.backward()
        return loss

    optimizer.step(closure)
    x = np.vstack([_design(data[n][0]) for n in modules])
    pooled = np.linalg.lstsq(x, np.concatenate([data[n][1].double().numpy() for n in modules]), rcond=None)[0]
    for n, m in modules.items():
        got = m.head(data[n][0]).squeeze(-1).detach().double().numpy()
        np.testing.assert_allclose(got, _design(data[n][0]) @ pooled, atol=1e-3)


def test_auto_penalty_is_the_least_leave_one_out_error_over_every_task():
    shared, modules, data = _offset_heads("auto", tasks=4, rows=12, noise=2.0)
    lam = shared_plus_offset.refit({n: (m.head, *data[n]) for n, m in modules.items()}, "auto", 1)
    totals = []
    for grid in shared_plus_offset.LAMBDAS.tolist():
        total = 0.0
        for n in modules:
            f, y = data[n]
            x, r = _design(f), y.double().numpy() - shared["regression:1"](f).squeeze(-1).detach().double().numpy()
            for i in range(len(r)):  # refit without row i, predict it
                keep = np.arange(len(r)) != i
                coef = np.linalg.solve(x[keep].T @ x[keep] + grid * np.eye(4), x[keep].T @ r[keep])
                total += (r[i] - x[i] @ coef) ** 2
        totals.append(total)
    assert lam == pytest.approx(shared_plus_offset.LAMBDAS[int(np.argmin(totals))].item())
    assert 0 < int(np.argmin(totals)) < len(totals) - 1  # a real choice, not an end of the grid
    assert all(float(m.head.lam) == lam for m in modules.values())


def _setup(names, architecture="hard"):
    options = {"experts": 2} if architecture != "hard" else {}
    cfg = ModelConfig(trunk=TrunkConfig(widths=[8]), architecture=architecture, **options)  # heads: shared_plus_offset
    shapes = {n: TaskShape(n, "regression", 4) for n in ("a", "b", "c")}
    torch.manual_seed(0)
    trunk = build_trunk(cfg, list(shapes.values()))
    shared = build_shared_heads(cfg, list(shapes.values()), 0)
    modules = build_task_modules(cfg, list(shapes.values()), 0, only=names, shared=shared, rows=dict.fromkeys(shapes, 10))
    batches = {n: (_features(i, 10, 4), _features(20 + i, 10, 1)[:, 0] * (i - 1)) for i, n in enumerate(shapes) if n in names}
    return trunk, shared, modules, shapes, batches


def _steps(trunk, shared, modules, shapes, batches, world, steps=3):
    from distributed_mtml.heads import sync_shared_grads
    from distributed_mtml.models import head_parameters
    from distributed_mtml.train.step import multitask_step

    optimizer = torch.optim.Adam([*trunk.parameters(), *shared.parameters(), *modules.parameters()], lr=0.05)
    optimizer.register_step_pre_hook(lambda *_: sync_shared_grads(shared, world))
    assert {id(p) for p in head_parameters(modules)} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    synced = torch.nn.parallel.DistributedDataParallel(trunk) if world > 1 else trunk
    for _ in range(steps):
        multitask_step(synced, modules, shapes, batches, optimizer, 1 / 3, trunk_grad_scale=world)


def _rank(rank, placement, port, out, architecture):
    from torch.nn.utils import parameters_to_vector

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(placement))
    trunk, shared, modules, shapes, batches = _setup(placement[rank], architecture)
    _steps(trunk, shared, modules, shapes, batches, len(placement))
    torch.save({"shared": parameters_to_vector(shared.parameters()).detach(),
                "trunk": parameters_to_vector(trunk.parameters()).detach(),
                **{n: parameters_to_vector(m.parameters()).detach() for n, m in modules.items()}}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter finalisation (see test_aggregation._exit_cleanly)


@pytest.mark.parametrize("architecture", ["hard", "mmoe"])
def test_shared_heads_across_two_ranks_take_the_steps_of_one_process(tmp_path, architecture):
    """Tasks a, c on one rank and b on the other (the group shared by all three): after three
    Adam steps every rank's shared head, trunk (under mmoe: the shared experts) and task modules
    (offsets; gates) equal one process holding all tasks."""
    from torch.nn.utils import parameters_to_vector

    placement = [["a", "c"], ["b"]]
    mp.spawn(_rank, args=(placement, free_port(), str(tmp_path), architecture), nprocs=2)
    trunk, shared, modules, shapes, batches = _setup(["a", "b", "c"], architecture)
    before = parameters_to_vector(shared.parameters()).detach().clone()
    _steps(trunk, shared, modules, shapes, batches, 1)
    assert not torch.allclose(before, parameters_to_vector(shared.parameters()))
    for rank, owned in enumerate(placement):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["shared"], parameters_to_vector(shared.parameters()), atol=1e-6), rank
        assert torch.allclose(got["trunk"], parameters_to_vector(trunk.parameters()), atol=1e-6), rank
        for n in owned:
            assert torch.allclose(got[n], parameters_to_vector(modules[n].parameters()), atol=1e-6), (rank, n)


def test_heads_options_and_modes_are_checked_by_name():
    for raw, words in (({"model": {"heads": "pooled"}}, "unknown heads 'pooled'"),
                       ({"model": {"heads": "separate", "head_penalty": 3}}, "not an option of heads 'separate'"),
                       ({"model": {"embedding_dim": 4}}, "not an option of heads 'shared_plus_offset'"),
                       ({"model": {"head_penalty": -1}}, "key 'model.head_penalty': .*or 'auto' or 'em', got -1"),
                       ({"data": {"standardize": "group"}}, "data.standardize")):
        with pytest.raises(InputError, match=words):
            validate_config(raw)
    assert validate_config({"data": {"standardize": True}}).data.standardize == "suite"
    assert validate_config({"data": {"standardize": False}}).data.standardize == "off"
    assert validate_config({"model": {"head_penalty": float("inf")}}).model.head_penalty == float("inf")


def _pooled_test_mse(out, suite: str) -> float:
    counts = {t.name: len(load_task(suite, t).y["test"]) for t in load_suite_spec(suite).tasks}
    return sum(out.metrics[f"test/{n}/mse"] * c for n, c in counts.items()) / sum(counts.values())


def test_on_many_small_groups_the_default_heads_beat_separate_heads(ray_session, tmp_path):
    """A seeded 30-group multilevel suite, 16 rows a group, local mode: the default
    (shared_plus_offset, suite statistics) against separate heads on the same statistics, test
    MSE pooled over every test row of the kept models (read back from MLflow). Also: the
    learned penalty is logged, and the model's shared head reloads with it."""
    from distributed_mtml.tracking import Tracker
    from distributed_mtml.train.launch import run_training

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 30, "rows": 16, "between": 0.5, "seed": 3})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    results = {}
    for heads in ("shared_plus_offset", "separate"):
        cfg = validate_config({"suite": {"path": suite}, "model": {"heads": heads}, "scaling": {"num_workers": 0},
                               "training": {"epochs": 60, "batch_size": 32, "lr": 0.003, "early_stopping_patience": 15},
                               "checkpoint": {"dir": str(tmp_path / "runs")},
                               "tracking": {"task_metrics_limit": 30}})  # every group's MSE a key, read below
        results[heads] = run_training(cfg, heads, tracker)
    default, separate = (_pooled_test_mse(results[h], suite) for h in ("shared_plus_offset", "separate"))
    assert default < 0.95 * separate, (default, separate)
    assert results["shared_plus_offset"].metrics["heads/penalty"] > 0
    assert "heads/penalty" not in results["separate"].metrics


def _mixed_tasks(tasks: int, rows: int, noise_features: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Tasks of a mixed model: fixed slopes (1, -2, 0.5) on three inputs, a random intercept and
    a random slope on the first input. The head reads `noise_features` features the target does
    not depend on, then the inputs (as a passthrough trunk hands them on)."""
    effects = _features(99, tasks, 2) * 2.0
    data = {}
    for i in range(tasks):
        f = _features(i, rows, 3)
        y = f @ torch.tensor([1.0, -2.0, 0.5]) + effects[i, 0] + effects[i, 1] * f[:, 0] + 0.3 * _features(500 + i, rows, 1)[:, 0]
        data[f"t{i}"] = (torch.cat([_features(700 + i, rows, noise_features), f], 1), y)
    return data


def _em_problem(tasks: int, rows: int, noise_features: int):
    """Heads over a passthrough trunk of width `noise_features`, and `_mixed_tasks`."""
    cfg = ModelConfig(trunk=TrunkConfig(widths=[noise_features], passthrough=True), heads="shared_plus_offset",
                      head_penalty="em")
    shapes = [TaskShape(f"t{i}", "regression", 3) for i in range(tasks)]
    shared = build_shared_heads(cfg, shapes, 0)
    modules = build_task_modules(cfg, shapes, 0, shared=shared, rows={s.name: rows for s in shapes})
    return shared["regression:1"], modules, _mixed_tasks(tasks, rows, noise_features)


def _em_heads(tasks: int, rows: int, noise_features: int):
    """`_em_problem` after one EM refit."""
    shared, modules, data = _em_problem(tasks, rows, noise_features)
    shared_plus_offset.refit({n: (m.head, *data[n]) for n, m in modules.items()}, "em", 1,
                             last=shared_plus_offset.SharedLast(shared[1], inputs=3))
    return shared, modules, data


def _em_rank(rank, placement, port, out):
    """Two EM refits (cold, then warm) of this rank's tasks; saves the shared layer and offsets."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(placement))
    shared, modules, data = _em_problem(12, 10, 4)
    last = shared_plus_offset.SharedLast(shared[1], inputs=3)
    for _ in range(2):
        shared_plus_offset.refit({n: (modules[n].head, *data[n]) for n in placement[rank]}, "em", len(placement),
                                 last=last)
    torch.save({"shared": torch.cat([p.detach().reshape(-1) for p in shared.parameters()]),
                **{n: modules[n].head.offsets[-2].detach().clone() for n in placement[rank]}}, f"{out}/em{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def test_em_across_ranks_solves_what_one_process_solves_a_rank_without_tasks_included(tmp_path):
    placement = [[f"t{i}" for i in range(7)], [], [f"t{i}" for i in range(7, 12)]]
    mp.spawn(_em_rank, args=(placement, free_port(), str(tmp_path)), nprocs=3)
    shared, modules, data = _em_problem(12, 10, 4)
    before = torch.cat([p.detach().reshape(-1) for p in shared.parameters()])
    last = shared_plus_offset.SharedLast(shared[1], inputs=3)
    for _ in range(2):
        shared_plus_offset.refit({n: (m.head, *data[n]) for n, m in modules.items()}, "em", 1, last=last)
    after = torch.cat([p.detach().reshape(-1) for p in shared.parameters()])
    assert not torch.allclose(before, after)
    for rank, owned in enumerate(placement):
        got = torch.load(tmp_path / f"em{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["shared"], after, atol=1e-5, rtol=1e-4)
        for n in owned:
            torch.testing.assert_close(got[n], modules[n].head.offsets[-2].detach(), atol=1e-5, rtol=1e-4)


def test_em_learns_a_penalty_per_input_small_where_tasks_differ_and_a_new_group_is_solved_with_it():
    """40 tasks whose intercept and first slope vary (a mixed model's random intercept and slope)
    and whose other slopes do not: EM's prior variances are large on those two and tiny on the
    others, the shared layer is the fixed effects, and `solve_offsets` (a new group) is the
    ridge with that penalty per input."""
    shared, modules, _ = _em_heads(40, 20, noise_features=1)
    np.testing.assert_allclose(shared[1].weight.detach().numpy()[0, 1:], [1.0, -2.0, 0.5], atol=0.5)
    precision = modules["t0"].head.precision[1:]  # inputs x0, x1, x2, then the bias (after one learned feature)
    assert all(torch.equal(m.head.precision, modules["t0"].head.precision) for m in modules.values())
    assert min(precision[1], precision[2]) > 100 * max(precision[0], precision[3])
    f, y = _features(1000, 6, 4), _features(1001, 6, 1)[:, 0]
    new = shared_plus_offset.OffsetHead(shared, "em", 6)
    new.precision.copy_(modules["t0"].head.precision)
    shared_plus_offset.solve_offsets(new, f, y)
    x = _design(f)
    base = shared(f).squeeze(-1).detach().double().numpy()
    coef = np.linalg.solve(x.T @ x + np.diag(new.precision.numpy()), x.T @ (y.double().numpy() - base))
    np.testing.assert_allclose(new(f).squeeze(-1).detach().double().numpy(), base + x @ coef, atol=1e-5)


def test_em_shrinks_learned_features_the_target_does_not_depend_on():
    """Ten learned features of noise before the three inputs: their shared weights go to about
    zero (a ridge learned from the data) and the inputs' stay the fixed effects; without that
    block's own prior, least squares over 13 columns would give the noise weights of their own."""
    shared, _, data = _em_heads(40, 20, noise_features=10)
    weights = shared[1].weight.detach().numpy()[0]
    assert np.abs(weights[:10]).max() < 0.02, weights[:10]
    np.testing.assert_allclose(weights[10:], [1.0, -2.0, 0.5], atol=0.5)
    x = np.vstack([data[n][0].double().numpy() for n in data])
    y = np.concatenate([data[n][1].double().numpy() for n in data])
    unpenalised = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    assert np.abs(unpenalised[:10]).max() > 5 * np.abs(weights[:10]).max()


def test_a_passthrough_trunk_hands_its_input_to_the_heads_and_keeps_a_plain_trunks_state():
    shapes = [TaskShape("a", "regression", 4), TaskShape("b", "regression", 4)]
    plain = build_trunk(ModelConfig(trunk=TrunkConfig(widths=[8], passthrough=False)), shapes)
    cfg = ModelConfig(trunk=TrunkConfig(widths=[8], passthrough=True))
    trunk = build_trunk(cfg, shapes)
    assert list(trunk.state_dict()) == list(plain.state_dict())
    trunk.load_state_dict(plain.state_dict())
    x = _features(3, 5, 4)
    assert torch.equal(trunk(x), torch.cat([plain(x), x], -1))
    modules = build_task_modules(cfg, shapes, 0, shared=build_shared_heads(cfg, shapes, 0))
    assert modules["a"].head(trunk(x)).shape == (5, 1)


def test_heads_saved_before_a_penalty_per_input_load_with_their_one_penalty():
    shared, modules, _ = _offset_heads(5.0)
    state = {k: v for k, v in modules["t0"].head.state_dict().items() if k != "precision"}
    head = shared_plus_offset.OffsetHead(shared["regression:1"], 1.0, 40)
    head.load_state_dict(state)
    assert torch.equal(head.precision, torch.full((4,), 5.0, dtype=torch.float64))


def test_plans_saved_under_older_defaults_load_as_they_were_trained():
    """A saved plan holds every config key; one without `heads` predates head kinds (separate
    heads), one without `model.trunk.passthrough` predates it and `em` as defaults (and one
    without `head_penalty` predates `auto` too)."""
    from distributed_mtml.meta.plan import MetaPlan
    from distributed_mtml.train.plan import TrainPlan

    config = validate_config({"suite": {"path": "/nowhere"}}).model_dump(mode="json")
    assert config["model"]["trunk"]["passthrough"] and config["model"]["head_penalty"] == "em"
    plan = {"config": config, "suite_dir": "/nowhere", "suite_name": "s", "tasks": [], "train_rows": {}, "steps_per_epoch": 1}
    assert TrainPlan.model_validate(plan).config.model == validate_config({"suite": {"path": "/nowhere"}}).model
    del config["model"]["trunk"]["passthrough"], config["model"]["head_penalty"]
    model = TrainPlan.model_validate(plan).config.model
    assert (model.trunk.passthrough, model.head_penalty, model.heads) == (False, "auto", "shared_plus_offset")
    del config["model"]["heads"]
    assert TrainPlan.model_validate(plan).config.model.heads == "separate"
    config["model"] |= {"heads": "separate", "head_penalty": "auto"}  # a default once, refused now by separate
    assert TrainPlan.model_validate(plan).config.model.heads == "separate"
    meta = MetaPlan.model_validate({"config": config, "source": "family", "name": "sinusoid", "task": {}})
    assert not meta.config.model.trunk.passthrough


def _one_em_problem():
    shared, modules, data = _em_problem(4, 6, noise_features=12)
    return {n: (m.head, *data[n]) for n, m in modules.items()}, "em", 1, None, shared_plus_offset.SharedLast(
        shared[1], inputs=3)


def _em_twice(monkeypatch, rows_space: bool, learned: int = 12) -> list[torch.Tensor]:
    """Two EM refits (cold, warm) of 30 tasks of 5 to 7 rows and `learned` + 4 offsets each (12:
    more learned features than rows; 4: fewer, so their row Gram matrix is singular): the shared
    layer, then each task's offsets and precision."""
    calls, real = [], shared_plus_offset.RowSpace.solve
    monkeypatch.setattr(shared_plus_offset.RowSpace, "solve", lambda *a: calls.append(1) or real(*a))
    if not rows_space:  # every bucket solved in the offsets' space
        monkeypatch.setattr(shared_plus_offset, "_in_rows_space", lambda *a: False)
    shared, modules, data = _em_problem(30, 8, noise_features=learned)
    data = {n: (f[: 5 + i % 3], y[: 5 + i % 3]) for i, (n, (f, y)) in enumerate(data.items())}  # unequal rows: padded
    last = shared_plus_offset.SharedLast(shared[1], inputs=3)
    for _ in range(2):
        shared_plus_offset.refit({n: (m.head, *data[n]) for n, m in modules.items()}, "em", 1, last=last)
    monkeypatch.undo()
    assert bool(calls) == rows_space
    return [torch.cat([p.detach().reshape(-1) for p in shared.parameters()]),
            *(torch.cat([m.head.offsets[-2].detach().reshape(-1), m.head.precision]) for m in modules.values())]


@pytest.mark.parametrize("learned", [12, 4])
def test_em_in_the_rows_space_solves_what_the_offsets_space_solves(monkeypatch, learned):
    """With fewer rows a task than offsets EM solves in the rows' space (`RowSpace`): the same
    shared layer, offsets and penalties as the Cholesky form in the offsets' space."""
    calls = []
    real = shared_plus_offset.RowSpace.solve
    monkeypatch.setattr(shared_plus_offset.RowSpace, "solve", lambda *a: calls.append(1) or real(*a))
    shared_plus_offset.refit(*_one_em_problem())
    monkeypatch.undo()
    assert calls, "tasks with fewer rows than offsets were not solved in the rows' space"
    rows, offsets = _em_twice(monkeypatch, True, learned), _em_twice(monkeypatch, False, learned)
    assert not torch.allclose(rows[1], torch.zeros_like(rows[1]))
    for a, b in zip(rows, offsets):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the shared layer is float32


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_many_offset_heads_in_one_pass_give_each_tasks_loss_and_gradient(kind):
    """`task_losses` over many tasks of one shared head stacks their offsets (`stacked_outputs`,
    segment means, `stacked_penalties`): the same losses and gradients as one head at a time."""
    from distributed_mtml import models

    width = 3 if kind == "classification" else None
    cfg = ModelConfig(trunk=TrunkConfig(widths=[8]), heads="shared_plus_offset", head_penalty=2.0)
    shapes = {f"t{i}": TaskShape(f"t{i}", kind, 4, width) for i in range(6)}
    torch.manual_seed(0)
    trunk = build_trunk(cfg, list(shapes.values()))
    shared = build_shared_heads(cfg, list(shapes.values()), 0)
    modules = build_task_modules(cfg, list(shapes.values()), 0, shared=shared, rows={n: 5 + i for i, n in enumerate(shapes)})
    with torch.no_grad():
        for m in modules.values():
            for p in m.head.offsets:
                p.normal_(0, 0.3)
    batches = {n: (torch.randn(3 + i, 4), torch.randint(0, 3, (3 + i,)) if width else torch.randn(3 + i))
               for i, n in enumerate(shapes)}

    def run(stacked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in [*trunk.parameters(), *shared.parameters(), *modules.parameters()]:
            p.grad = None
        original = models.stacked_output
        models.stacked_output = original if stacked else (lambda heads, joined, sizes: None)
        try:
            losses = models.task_losses(trunk, modules, shapes, batches)
        finally:
            models.stacked_output = original
        losses.sum().backward()
        return losses.detach(), [p.grad.clone() for p in [*trunk.parameters(), *shared.parameters(),
                                                                       *modules.parameters()]]

    features = [trunk(x).detach() for x, _ in batches.values()]
    assert models.stacked_output([m.head for m in modules.values()], torch.cat(features), [len(f) for f in features]
                                 ) is not None  # the one pass ran
    (fast, fast_grads), (slow, slow_grads) = run(True), run(False)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b)


def test_offsets_bound_to_one_stacked_bank_train_read_and_save_as_each_tasks_own():
    """A worker binds its tasks' offsets to one [T, k, d] and [T, k] parameter pair
    (`offset_bank`): the losses and each task's gradient are those of unbound heads, heads taken
    in another order or a subset run through the bank's rows, and a task's state dict is the one
    it had unbound (and loads back into its row)."""
    from distributed_mtml import models
    from distributed_mtml.heads.offset_bank import bind_offsets

    cfg = ModelConfig(trunk=TrunkConfig(widths=[8]), heads="shared_plus_offset", head_penalty=2.0)
    shapes = {f"t{i}": TaskShape(f"t{i}", "regression", 4) for i in range(5)}

    def build(bound: bool):
        torch.manual_seed(0)
        trunk = build_trunk(cfg, list(shapes.values()))
        shared = build_shared_heads(cfg, list(shapes.values()), 0)
        modules = build_task_modules(cfg, list(shapes.values()), 0, shared=shared, rows={n: 5 + i for i, n in enumerate(shapes)})
        with torch.no_grad():
            for i, m in enumerate(modules.values()):
                for p in m.head.offsets:
                    p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * (i + 1) / 5)
        banks = bind_offsets(modules) if bound else torch.nn.ModuleList()
        return trunk, modules, banks

    batches = {n: (torch.randn(3 + i, 4), torch.randn(3 + i)) for i, n in enumerate(shapes)}
    (trunk, plain, _), (_, bound, banks) = build(False), build(True)
    assert len(banks) == 1 and banks[0].weight.shape[:2] == (5, 1) and not list(bound.parameters())
    losses = [models.task_losses(trunk, m, shapes, batches) for m in (plain, bound)]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for loss, m in zip(losses, (plain, bound)):
        loss.sum().backward(inputs=models.head_parameters(m))
    for row, m in enumerate(plain.values()):
        torch.testing.assert_close(banks[0].weight.grad[row], m.head.offsets[0].grad, rtol=0, atol=0)
        torch.testing.assert_close(banks[0].bias.grad[row], m.head.offsets[1].grad, rtol=0, atol=0)
    some = ["t3", "t0", "t4"]
    features = [trunk(batches[n][0]).detach() for n in some]
    stacked = shared_plus_offset.stacked_outputs([bound[n].head for n in some], features)
    for n, f, out in zip(some, features, stacked):
        torch.testing.assert_close(out, plain[n].head(f))
    for n in shapes:
        saved = plain[n].state_dict()
        assert list(bound[n].state_dict()) == list(saved)
        assert all(torch.equal(bound[n].state_dict()[k], v) for k, v in saved.items())
    bound["t2"].load_state_dict(plain["t4"].state_dict())
    assert torch.equal(banks[0].weight[2], plain["t4"].head.offsets[0]) and torch.equal(banks[0].bias[2], plain["t4"].head.offsets[1])


@pytest.mark.parametrize("rows", [6, 20])
def test_leave_one_out_errors_from_the_spectrum_equal_refitting_without_each_row(rows):
    """`auto`'s closed-form leave-one-out errors, from X X^T's eigenvectors (fewer rows than
    columns) or the SVD, equal ridge refitted without each row in turn, zero-row padding included."""
    g = torch.Generator().manual_seed(rows)
    x = torch.zeros(2, rows + 2, 10, dtype=torch.float64)
    x[:, :rows] = torch.randn(2, rows, 10, generator=g, dtype=torch.float64)
    r = torch.zeros(2, rows + 2, dtype=torch.float64)
    r[:, :rows] = torch.randn(2, rows, generator=g, dtype=torch.float64)
    got = shared_plus_offset._loo_errors(*shared_plus_offset._spectrum(x), r)
    for b in range(2):
        for k in (0, 15, 30):
            lam = float(shared_plus_offset.LAMBDAS[k])
            total = 0.0
            for i in range(rows):
                keep = [j for j in range(rows) if j != i]
                xs, rs = x[b, keep], r[b, keep]
                w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(10, dtype=torch.float64), xs.T @ rs)
                total += float((r[b, i] - x[b, i] @ w) ** 2)
            assert float(got[b, k]) == pytest.approx(total, rel=1e-6)
