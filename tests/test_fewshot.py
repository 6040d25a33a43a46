"""Few-shot on suites: K shots mean K labels (no other label of a new task reaches the model or a
transform), one transform everywhere, small tasks left out and counted, validation on tasks held
out of meta-training, and adaptation that pays on a small generated suite."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distributed_mtml.config import validate_config
from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_suite_spec
from distributed_mtml.errors import InputError
from distributed_mtml.meta.algorithms import meta_gradient
from distributed_mtml.meta.checkpoint import build_learner, save_meta_state
from distributed_mtml.meta.evaluate import few_shot_curve, held_out_episodes
from distributed_mtml.meta.plan import make_meta_plan
from distributed_mtml.meta.tasks import SuiteEpisodes, episode_generator
from distributed_mtml.predict import Predictor

SHOTS, QUERY = 4, 6


def _split_suite(root, groups=16, rows=30, held=4, seed=0) -> tuple[str, str]:
    """A multilevel suite cut in two: training groups, and new groups (a suite of their own)."""
    make_suite("multilevel", str(root / "all"), {"groups": groups, "rows": rows, "between": 0.6, "seed": seed})
    spec = yaml.safe_load(open(root / "all" / "suite.yaml"))
    out = []
    for name, tasks in (("train", spec["tasks"][:-held]), ("new", spec["tasks"][-held:])):
        os.makedirs(root / name)
        moved = [{**t, "path": str(root / "all" / t["path"])} for t in tasks]
        yaml.safe_dump({**spec, "tasks": moved}, open(root / name / "suite.yaml", "w"))
        out.append(str(root / name))
    return out[0], out[1]


def _plan(suite: str, standardize: str = "suite", **meta) -> dict:
    config = validate_config({"suite": {"path": suite}, "data": {"standardize": standardize},
                              "meta": {"shots": SHOTS, "query": QUERY, **meta}, "scaling": {"num_workers": 0}})
    return make_meta_plan(config).model_dump(mode="json")


def _saved(tmp_path, plan: dict, learner, adapt_steps: int | None = None) -> str:
    """A model directory of `learner` as meta-training saves it."""
    directory = str(tmp_path / "model")
    os.makedirs(directory)
    save_meta_state(directory, 1, plan, learner, torch.optim.Adam(learner.parameters()), adapt_steps=adapt_steps)
    return directory


def _episodes_with_rows(plan, suite, monkeypatch):
    """The held-out episodes, and each one's rows as positions in its task's concatenated splits."""
    drawn, real = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: drawn.append(real(n, **kw)) or drawn[-1])
    episodes = held_out_episodes(plan, suite, SHOTS, QUERY, 1)
    monkeypatch.setattr(torch, "randperm", real)
    return episodes, drawn[-1][: SHOTS + QUERY]


@pytest.mark.parametrize("standardize", ["suite", "task"])
def test_query_labels_of_a_new_task_change_no_input_and_no_prediction(tmp_path, monkeypatch, standardize):
    """Every label of the new task but its K support rows' is changed: what the model is given
    (support rows, their labels, query rows) and so what it predicts stay the same. Before,
    each new task was standardised by its whole train split, query rows among them."""
    train, new = _split_suite(tmp_path, held=1)
    plan = _plan(train, standardize)
    before, rows = _episodes_with_rows(plan, new, monkeypatch)
    task = load_suite_spec(new).tasks[0]
    table = pq.read_table(task.path)
    order = np.concatenate([np.flatnonzero(np.asarray(table.column("split").to_pylist()) == s) for s in SPLITS])
    support = order[rows[:SHOTS].numpy()]
    y = table.column("y").to_numpy().copy()
    others = np.setdiff1d(np.arange(len(y)), support)
    y[others] = y[others] * 3 + 50
    pq.write_table(table.set_column(table.column_names.index("y"), "y", pa.array(y)), task.path)
    after, _ = _episodes_with_rows(plan, new, monkeypatch)
    for name in ("xs", "ys", "xq"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert not torch.equal(before.yq, after.yq)
    learner = build_learner(plan)
    curves = [few_shot_curve(learner, e, steps=2)["loss"] for e in (before, after)]
    assert curves[0] != curves[1]  # the query labels are what is scored ...
    learner.eval()
    with torch.no_grad():  # ... and the predictions do not move
        preds = [learner.outputs(learner.params(), e.xq[0]) for e in (before, after)]
    assert torch.equal(preds[0], preds[1])


def test_suite_statistics_are_saved_with_the_model_and_one_transform_serves_training_and_new_tasks(tmp_path):
    train, _ = _split_suite(tmp_path)
    plan = _plan(train)
    assert plan["prep"]["target_std"] > 0 and len(plan["prep"]["feature_mean"]) == len(plan["features"])
    assert build_learner(plan).model.preprocessing["meta"].model_dump() == plan["prep"]
    assert _plan(train, "task")["prep"] is None and _plan(train, "off")["prep"] is None


@pytest.mark.parametrize("standardize", ["suite", "task"])
def test_predict_adapt_from_transforms_a_new_task_as_evaluation_does(tmp_path, standardize):
    """`mtml predict --adapt-from` with an episode's K support rows scores them exactly as the
    few-shot evaluation's episode does: the same transform (saved, or of those K rows)."""
    train, new = _split_suite(tmp_path)
    plan = _plan(train, standardize)
    learner = build_learner(plan)
    directory = _saved(tmp_path, plan, learner)
    task = load_suite_spec(new).tasks[0]
    raw = pq.read_table(task.path).to_pandas()
    raw = pd.concat([raw[raw.split == s] for s in SPLITS])  # the order episodes draw from
    rows = {task.name: (torch.from_numpy(raw[plan["features"]].to_numpy(np.float32)), torch.from_numpy(raw.y.to_numpy().copy()))}
    by_support = standardize == "task"
    if not by_support:
        prep = learner.model.preprocessing["meta"]
        rows = {task.name: (torch.from_numpy(prep.inputs(rows[task.name][0].numpy())),
                            torch.from_numpy(np.asarray(prep.scaled_target(rows[task.name][1].numpy()))))}
    episode = SuiteEpisodes(rows, SHOTS, QUERY, by_support).episode(task.name, episode_generator(0, 1))
    drawn = torch.randperm(len(raw), generator=episode_generator(0, 1))[:SHOTS].numpy()
    predictor = Predictor(directory)
    loss = predictor.adapt(raw.iloc[drawn], "y", 0)
    with torch.no_grad():
        want = float(learner.loss(learner.params(), episode.xs[0], episode.ys[0]))
    assert loss == pytest.approx(want, rel=1e-5)


def test_tasks_too_small_for_an_episode_are_left_out_and_counted(tmp_path, capsys):
    train, _ = _split_suite(tmp_path)
    spec = load_suite_spec(train)
    for task in spec.tasks[:3]:  # 3 tasks keep fewer labelled train rows than shots + query
        table = pq.read_table(task.path)
        y = table.column("y").to_numpy().copy()
        train_rows = np.flatnonzero(np.asarray(table.column("split").to_pylist()) == "train")
        y[train_rows[SHOTS:]] = np.nan
        pq.write_table(table.set_column(table.column_names.index("y"), "y", pa.array(y)), task.path)
    plan = _plan(train)
    used = plan["suite_tasks"] + plan["held_tasks"]
    assert len(used) == len(spec.tasks) - 3 and not {t.name for t in spec.tasks[:3]} & set(used)
    assert f"3 of {len(spec.tasks)} tasks have fewer than {SHOTS + QUERY} labelled train rows" in capsys.readouterr().out
    with pytest.raises(InputError, match="no task has the 1000 labelled train rows an episode needs"):
        _plan(train, shots=500, query=500)


def test_validation_episodes_come_from_tasks_held_out_of_meta_training(tmp_path):
    from distributed_mtml.meta.plan import MetaPlan

    train, _ = _split_suite(tmp_path)
    plan = MetaPlan.model_validate(_plan(train, val_task_share=0.25))
    assert len(plan.held_tasks) == 3 and not set(plan.held_tasks) & set(plan.suite_tasks)
    for world in (1, 2):
        for rank in range(world):
            assert {t for _, t in plan.episodes_of(rank, world, 20, validation=True)} <= set(plan.held_tasks)
            assert {t for _, t in plan.episodes_of(rank, world, 20, first=7)} <= set(plan.suite_tasks)
    assert MetaPlan.model_validate(_plan(train, val_task_share=0)).held_tasks == []


@pytest.mark.parametrize("algorithm", ["maml", "ridge_head"])
def test_adaptation_lowers_the_query_loss_of_new_groups_below_step_0(tmp_path, algorithm):
    """Meta-trained in this process on a small generated suite (seeded), a new group's query
    loss after adapting to its K rows is below the unadapted model's, and below the support-mean
    shift."""
    train, new = _split_suite(tmp_path, groups=24, held=6)
    plan = _plan(train, algorithm=algorithm, val_task_share=0)
    learner = build_learner(plan)
    rows = {}
    from distributed_mtml.data.tasks import load_task
    from distributed_mtml.meta.plan import MetaPlan

    meta = MetaPlan.model_validate(plan)
    for task in load_suite_spec(train).tasks:
        rows[task.name] = meta.task_rows(load_task(train, task))["train"]
    source = SuiteEpisodes(rows, SHOTS, QUERY)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    for i in range(300):
        meta_gradient(learner, source.sample(episode_generator(0, 0, i), 16), 1, 16)
        optimizer.step()
    curve = few_shot_curve(learner, held_out_episodes(plan, new, SHOTS, QUERY, 200), steps=1)
    (zero, half), (adapted, _) = curve["loss"]
    assert adapted < zero - half and adapted < curve["support_mean"][0][0]


def test_predict_adapt_from_a_few_hundred_rows_starts_no_ray(tmp_path, monkeypatch, capsys):
    """A new group's rows (one batch) are adapted to and predicted in the command's process."""
    import ray

    from distributed_mtml.cli import main

    train, new = _split_suite(tmp_path)
    plan = _plan(train)
    directory = _saved(tmp_path, plan, build_learner(plan))
    rows = pq.read_table(load_suite_spec(new).tasks[0].path).to_pandas()
    rows.head(SHOTS).to_parquet(tmp_path / "labelled.parquet")
    rows.to_parquet(tmp_path / "rows.parquet")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mtml` process
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    assert main(["predict", "--model", directory, "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "out"), "--adapt-from", str(tmp_path / "labelled.parquet"), "--target", "y"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(rows)} rows of predictions" in printed
    assert "each of those rows predicted from the others (each left out), MSE in y's units: adapted" in printed
    got = pd.read_parquet(tmp_path / "out")["meta"].to_numpy()
    want = Predictor(directory)
    want.adapt(rows.head(SHOTS), "y", 10)
    np.testing.assert_allclose(got, want.predict(rows)["meta"].to_numpy(), rtol=1e-5)


def test_adapt_from_anchors_predict_each_labelled_row_from_the_others(tmp_path):
    """`Predictor.anchors`: each labelled row predicted by the model adapted on the other rows,
    by it unadapted and by the others' mean, as a loop over the rows computes them."""
    train, new = _split_suite(tmp_path)
    plan = _plan(train)
    directory = _saved(tmp_path, plan, build_learner(plan))
    rows = pq.read_table(load_suite_spec(new).tasks[0].path).to_pandas().head(6)
    got = Predictor(directory).anchors(rows, "y", 3)
    want = {"adapted": [], "unadapted": [], "mean": []}
    for i in range(len(rows)):
        others, held = rows.drop(index=rows.index[i]), rows.iloc[[i]]
        for name, steps in (("unadapted", 0), ("adapted", 3)):
            predictor = Predictor(directory)
            predictor.adapt(others, "y", steps)
            want[name].append(float(predictor.predict(held)["meta"].iloc[0] - held["y"].iloc[0]) ** 2)
        want["mean"].append(float(others["y"].mean() - held["y"].iloc[0]) ** 2)
    assert (got["folds"], got["rows"]) == (6, 6)
    for name, errors in want.items():
        assert got[name] == pytest.approx(np.mean(errors), rel=1e-4), name
    assert got["adapted"] != got["unadapted"]


def test_the_validated_step_count_is_the_curves_best_and_predict_adapts_with_it(tmp_path, capsys):
    """Validation scores 0..VALIDATED_STEPS inner steps and names the best; saved with the model,
    it is what `mtml predict --adapt-from` takes unless told (here 0: no step, the unadapted model)."""
    from distributed_mtml.cli import main
    from distributed_mtml.meta.algorithms import adaptation_curve
    from distributed_mtml.meta.worker import VALIDATED_STEPS, _validation

    train, new = _split_suite(tmp_path)
    plan = _plan(train)
    learner = build_learner(plan)
    episodes = held_out_episodes(plan, new, SHOTS, QUERY, 40)
    found = _validation(learner, episodes, 1, 40, 1)
    curve = adaptation_curve(learner, episodes, VALIDATED_STEPS)["loss"].double().mean(0)
    assert found["val/meta/best_steps"] == int(curve.argmin())
    assert found["val/meta/loss"] == pytest.approx(float(curve[1])) and found["val/meta/loss_before"] == pytest.approx(float(curve[0]))
    directory = _saved(tmp_path, plan, learner, adapt_steps=0)
    assert Predictor(directory).adapt_steps == 0
    rows = pq.read_table(load_suite_spec(new).tasks[0].path).to_pandas()
    rows.head(SHOTS).to_parquet(tmp_path / "labelled.parquet")
    rows.to_parquet(tmp_path / "rows.parquet")
    assert main(["predict", "--model", directory, "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "out"), "--adapt-from", str(tmp_path / "labelled.parquet"), "--target", "y"]) == 0
    assert "(0 steps)" in capsys.readouterr().out
    got = pd.read_parquet(tmp_path / "out")["meta"].to_numpy()
    want = Predictor(directory)
    want.adapt(rows.head(SHOTS), "y", 0)
    np.testing.assert_allclose(got, want.predict(rows)["meta"].to_numpy(), rtol=1e-5)
