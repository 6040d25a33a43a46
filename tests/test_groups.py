"""One table with a group column: a task per value, read once and cut by group (`data/tasks.py`),
its bad input, and `predict` routing rows by their group."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from distributed_mtml.cli import main
from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import scan_tasks
from distributed_mtml.data.stream import split_batches
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import group_summaries, load_suite_spec, load_tasks

SIZES = {"north": 40, "south": 25, "east.1": 12, "west": 3}


def _table(rows: dict[str, int], seed: int = 0) -> pa.Table:
    """Rows of each store, shuffled together as a user's table is."""
    rng = np.random.default_rng(seed)
    store = np.concatenate([[name] * n for name, n in rows.items()])
    store = store[rng.permutation(len(store))]
    x = rng.normal(size=(len(store), 3))
    y = x @ [1.0, -2.0, 0.5] + rng.normal(size=len(store))
    return pa.table({"store": store, "a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y, "row": np.arange(len(store))})


def _suite(directory, table: pa.Table | None = None, hive: bool = False, **entry) -> str:
    """A suite of one entry over `sales` (a file, or a Hive-partitioned directory by store)."""
    table = _table(SIZES) if table is None else table
    if hive:
        pads.write_dataset(table, str(directory / "sales"), format="parquet", partitioning=["store"],
                           partitioning_flavor="hive")
    else:
        pq.write_table(table, directory / "sales")
    task = {"name": "stores", "type": "regression", "path": "sales", "target": "y", "features": ["a", "b", "c"],
            "group_column": "store", **entry}
    (directory / "suite.yaml").write_text(yaml.safe_dump({"name": "shops", "tasks": [task]}))
    return str(directory)


@pytest.mark.parametrize("hive", [False, True], ids=["one file", "hive partitions"])
def test_a_group_column_makes_a_task_per_value_with_exactly_its_rows(tmp_path, hive):
    suite = _suite(tmp_path, hive=hive)
    spec = load_suite_spec(suite)
    names = {"stores/north": "north", "stores/south": "south", "stores/east_1": "east.1", "stores/west": "west"}
    assert sorted(t.name for t in spec.tasks) == sorted(names)
    frame = _table(SIZES).to_pandas()
    loaded = load_tasks(suite, spec.tasks, {})
    for name, store in names.items():
        data = loaded[name]
        got = np.sort(np.concatenate([data.y[s] for s in SPLITS]))
        assert np.allclose(got, np.sort(frame.y[frame.store == store].to_numpy()), rtol=1e-6), name
        assert data.features == ["a", "b", "c"]
        counts = [len(data.y[s]) for s in SPLITS]
        n = SIZES[store]
        assert counts == [n - 2 * round(0.15 * n), round(0.15 * n), round(0.15 * n)]  # seeded within the group


def test_scan_in_one_pass_agrees_with_the_loaded_rows_and_streaming_agrees_too(tmp_path):
    suite = _suite(tmp_path)
    spec = load_suite_spec(suite)
    scans = scan_tasks(suite, spec.tasks)
    loaded = load_tasks(suite, spec.tasks, {})
    for task in spec.tasks:
        assert scans[task.name].rows == {s: len(loaded[task.name].y[s]) for s in SPLITS}
        assert scans[task.name].y.mean[0] == pytest.approx(loaded[task.name].y["train"].mean(), rel=1e-5)
        streamed = torch_cat(split_batches(suite, task, "val", TaskPrep(), batch_rows=4))
        assert np.allclose(streamed, loaded[task.name].y["val"])


def torch_cat(batches) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32), *(y.numpy() for _, y in batches)])


def test_small_groups_are_left_out_and_counted_or_pooled_into_one_task(tmp_path):
    dropped = load_suite_spec(_suite(tmp_path, min_group_rows=20))
    assert sorted(t.name for t in dropped.tasks) == ["stores/north", "stores/south"]
    line = group_summaries(dropped)["stores"].line()
    assert "2 tasks from group column 'store'" in line and "2 groups under min_group_rows (15 rows) left out" in line
    (tmp_path / "p").mkdir()
    pooled = load_suite_spec(_suite(tmp_path / "p", min_group_rows=20, small_groups="pool"))
    assert [t.name for t in pooled.tasks][-1] == "stores/_pooled"
    rows = load_tasks(str(tmp_path / "p"), pooled.tasks, {})["stores/_pooled"]
    assert sum(len(rows.y[s]) for s in SPLITS) == SIZES["east.1"] + SIZES["west"]


def _validate(suite: str, capsys) -> tuple[int, list[str]]:
    code = main(["data", "validate", suite])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", ["missing column", "nulls", "no train rows"])
def test_bad_group_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    table = _table(SIZES)
    entry = {}
    if case == "missing column":
        entry = {"group_column": "shop"}
    elif case == "nulls":
        store = table.column("store").to_pylist()
        store[5] = None
        table = table.set_column(0, "store", pa.array(store))
    else:  # a split column: every store's rows in turn train, val, test, but 'west' has val and test rows only
        store = table.column("store").to_numpy(zero_copy_only=False)
        split = np.empty(len(store), dtype=object)
        for name in SIZES:
            mine = np.flatnonzero(store == name)
            turns = ["val", "test", "test"] if name == "west" else ["train", "val", "test"]
            split[mine] = [turns[i % 3] for i in range(len(mine))]
        table = table.append_column("split", pa.array(list(split)))
    suite = _suite(tmp_path, table, **entry)
    code, lines = _validate(suite, capsys)
    expected = {"missing column": "group column 'shop' not found (entry 'stores')",
                "nulls": "group column 'store' has 1 null value(s); every row needs a group (entry 'stores')",
                "no train rows": "(group 'stores/west'): split column 'split': split 'train' is empty"}[case]
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_validate_and_show_summarise_a_grouped_entry(tmp_path, capsys):
    suite = _suite(tmp_path, min_group_rows=5)
    assert main(["data", "validate", suite]) == 0
    out = capsys.readouterr().out
    assert "ok (3 tasks)" in out and "rows per task min 12 / median 25 / max 40; 1 groups under min_group_rows (3 rows) left out" in out
    many = {f"s{i:03d}": 5 for i in range(30)}
    (tmp_path / "many").mkdir()
    suite = _suite(tmp_path / "many", _table(many))
    assert main(["data", "show", suite]) == 0
    out = capsys.readouterr().out
    assert "entry 'stores': 30 tasks" in out and "stores/s001" not in out  # one line, not thirty


def _train(tmp_path, suite: str, name: str, heads: str) -> str:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"suite: {{path: {suite}}}\nmodel: {{heads: {heads}}}\ntraining: {{epochs: 2}}\n"
                      "scaling: {num_workers: 0}\n")
    assert main(["train", "--config", str(config), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--experiment", name]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return run.info.run_id


def test_predict_routes_each_row_by_its_group_and_a_new_group_by_the_shared_head(ray_session, tmp_path, capsys):
    """Each row's routed prediction is its own task's (asked by --tasks); rows of a group the model
    has not seen get the shared head's prediction (the same for the same features, whatever the
    new group is called), said so; a model without a shared head refuses them in one line."""
    suite = _suite(tmp_path, min_group_rows=10)  # 'west' (3 rows) is left out: a group the model never saw
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _train(tmp_path, suite, "shared", "shared_plus_offset")
    rows = _table(SIZES).to_pandas()
    rows = pd.concat([rows, rows[rows.store == "west"].assign(store="brand-new")], ignore_index=True)
    rows.to_parquet(tmp_path / "rows.parquet")
    capsys.readouterr()
    assert main(["predict", "--model", f"runs:/{run}/model", "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "routed"), "--keep", "store,row", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "2 group(s) the model was not trained on (brand-new, west) predicted by the shared head" in out
    routed = pd.read_parquet(tmp_path / "routed")
    assert list(routed.columns) == ["stores", "store", "row"] and len(routed) == len(rows)
    tasks = "stores/north,stores/south,stores/east_1"
    assert main(["predict", "--model", f"runs:/{run}/model", "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "each"), "--tasks", tasks, "--tracking-uri", uri]) == 0
    each = pd.read_parquet(tmp_path / "each")
    for store, task in [("north", "stores/north"), ("south", "stores/south"), ("east.1", "stores/east_1")]:
        mine = (routed.store == store).to_numpy()
        assert np.allclose(routed.stores[mine], each[task][mine], atol=1e-5)
    new = routed.stores[routed.store == "brand-new"].to_numpy()
    assert np.allclose(new, routed.stores[routed.store == "west"].to_numpy()) and np.isfinite(new).all()
    assert not np.allclose(new, each["stores/north"][(rows.store == "brand-new").to_numpy()])  # not a task's own head
    separate = _train(tmp_path, suite, "separate", "separate")
    capsys.readouterr()
    assert main(["predict", "--model", f"runs:/{separate}/model", "--input", str(tmp_path / "rows.parquet"),
                 "--out", str(tmp_path / "refused"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "value(s) ['brand-new', 'west'] the model was not trained on" in err[0], err


def test_metrics_by_segment_reductions_equal_a_loop_over_tasks():
    """Many regression tasks' validation in one pass (`regression_metrics_by_task`) gives each
    task exactly what `task_metrics` gives it alone, in the target's units."""
    import torch

    from distributed_mtml.metrics import regression_metrics_by_task, task_metrics
    from distributed_mtml.models import TaskShape

    g = torch.Generator().manual_seed(0)
    sizes = [1, 2, 7, 40, 3] * 10
    outputs = [torch.randn(n, 1, generator=g) for n in sizes]
    targets = [torch.randn(n, generator=g) for n in sizes]
    preps = [TaskPrep(target_mean=float(k), target_std=0.5 + k / 10) if k % 3 else None for k in range(len(sizes))]
    together = regression_metrics_by_task(outputs, targets, preps)
    assert regression_metrics_by_task([], [], []) == []  # a rank without regression tasks
    for k, (o, t, p) in enumerate(zip(outputs, targets, preps)):
        alone = task_metrics(TaskShape(f"t{k}", "regression", 3), o, t, p)
        assert together[k].keys() == alone.keys()
        for key, value in alone.items():
            assert together[k][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (k, key)


@pytest.mark.e2e  # three 1,000-task runs
def test_a_thousand_groups_checkpoint_in_one_file_and_resume_where_they_stopped(ray_session, tmp_path, capsys):
    """1,000 groups of one table, local mode: a checkpoint holds the tasks in one stacked file,
    and a run stopped after epoch 2 resumes to the numbers an unbroken run reaches at epoch 3
    (every head, its Adam state and the heads' EM state restored)."""
    import glob

    from mlflow.tracking import MlflowClient

    from distributed_mtml.config import validate_config
    from distributed_mtml.data.generators import make_suite
    from distributed_mtml.tracking import Tracker
    from distributed_mtml.train.launch import run_training

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 1000, "rows": 10, "one_table": True, "seed": 0})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")

    def config(epochs: int):
        return validate_config({"suite": {"path": suite}, "scaling": {"num_workers": 0},
                                "training": {"epochs": epochs, "report_every_s": 0},
                                "checkpoint": {"every_n_epochs": 1, "dir": str(tmp_path / "runs")}})

    whole = run_training(config(3), "whole", tracker)
    first = run_training(config(2), "broken", tracker)
    checkpoint = sorted(glob.glob(str(tmp_path / "runs" / "broken*" / "checkpoint_epoch=*")))[-1]
    files = os.listdir(checkpoint)
    assert "tasks_rank0.pt" in files and len(files) < 10, files  # not a file per task
    client = MlflowClient(tracker.uri)
    client.set_terminated(first.run_id, status="KILLED")
    capsys.readouterr()
    again = run_training(config(3), "broken", tracker, resume=True)
    assert again.run_id == first.run_id and "after epoch 2 (checkpoint" in capsys.readouterr().out
    for key in ("val/mean_loss", "tasks/val/mse/median", "tasks/train/loss/worst"):
        ref = {m.step: m.value for m in client.get_metric_history(whole.run_id, key)}
        got = {m.step: m.value for m in client.get_metric_history(first.run_id, key)}
        assert sorted(got) == [0, 1, 2] and got == pytest.approx(ref, rel=1e-5), key


def test_one_pass_over_a_grouped_table_gives_each_task_its_labelled_rows_of_a_split(tmp_path):
    """`tasks_split_batches` (one pass, cut by group) equals each task's own `split_batches`, with
    unlabelled rows (a null target) left out and the seeded split of every row kept."""
    from distributed_mtml.data.stream import tasks_split_batches

    table = _table(SIZES)
    y = table.column("y").to_pylist()
    table = table.set_column(table.schema.get_field_index("y"), "y", pa.array([None if i % 5 == 0 else v for i, v in enumerate(y)]))
    suite = _suite(tmp_path, table, min_group_rows=10)
    tasks = load_suite_spec(suite).tasks
    preps = {t.name: TaskPrep() for t in tasks}
    for split in SPLITS:
        together: dict[str, list] = {t.name: [] for t in tasks}
        for name, (_, y) in tasks_split_batches(suite, tasks, split, preps, batch_rows=7):
            together[name].append(y.numpy())
        for task in tasks:
            alone = torch_cat(split_batches(suite, task, split, TaskPrep()))
            got = np.concatenate([np.zeros(0, np.float32), *together[task.name]])
            assert np.array_equal(got, alone) and not np.isnan(got).any(), (split, task.name)


def test_relations_above_the_task_metrics_limit_are_refused_before_ray(tmp_path, capsys):
    """A relation matrix is a metric per task pair: above the limit that is refused, exit 2 in one
    line, before any worker starts (this test is not marked `ray`: starting Ray would fail it)."""
    from distributed_mtml.data.generators import make_suite

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 8, "rows": 10, "one_table": True})
    config = tmp_path / "c.yaml"
    config.write_text(f"suite: {{path: {suite}}}\nrelations: {{enabled: true}}\ntracking: {{task_metrics_limit: 4}}\n"
                      "scaling: {num_workers: 0}\n")
    assert main(["train", "--config", str(config), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "relations.enabled: 8 tasks would log 128 relation metrics" in err[0], err
