"""One table, several targets, missing values: a row whose target is null is no row of that
task (not in its loss, metrics, baseline or statistics, but counted), a missing feature value is
an error unless `data.impute: mean` fills it, and tasks that share a file read it once."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distributed_mtml.baseline import baseline_metrics
from distributed_mtml.data import tasks as tasks_module
from distributed_mtml.data.prepare import TaskPrep, plan_preprocessing
from distributed_mtml.data.scan import Moments, scan_task
from distributed_mtml.data.stream import split_batches
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_suite_spec, load_task, load_tasks
from distributed_mtml.data.validate import checked_scans, validate_suite

ROWS = 240
FEATURES = ["x0", "x1", "x2"]


def _table(rng: np.random.Generator) -> pa.Table:
    """Two targets measured on different rows: a price (NaN where unknown) and a churn flag
    (null where unknown), with a split column."""
    x = rng.normal(size=(ROWS, 3))
    price = x @ [2.0, -1.0, 0.5] + 10 + rng.normal(size=ROWS) * 0.3
    price[rng.random(ROWS) < 0.3] = np.nan
    churn = [None if u < 0.25 else int(v > 0) for u, v in zip(rng.random(ROWS), x[:, 1])]
    split = np.array(["train", "train", "train", "train", "val", "test"] * (ROWS // 6))
    return pa.table({**{f: x[:, i] for i, f in enumerate(FEATURES)}, "price": price,
                     "churn": pa.array(churn, pa.int64()), "split": split})


def _write(directory: str, files: dict[str, pa.Table], tasks: list[dict]) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, table in files.items():
        pq.write_table(table, os.path.join(directory, name), row_group_size=50)
    with open(os.path.join(directory, "suite.yaml"), "w") as f:
        yaml.safe_dump({"name": "shared", "tasks": tasks}, f)
    return directory


def _tasks(price_file: str, churn_file: str) -> list[dict]:
    return [{"name": "price", "type": "regression", "path": price_file, "target": "price", "features": FEATURES},
            {"name": "churn", "type": "classification", "path": churn_file, "target": "churn", "num_classes": 2,
             "features": FEATURES}]


@pytest.fixture
def suites(tmp_path):
    """The same data twice: one shared file with unlabelled rows, and a file per task holding
    only that task's labelled rows."""
    table = _table(np.random.default_rng(3))
    shared = _write(str(tmp_path / "shared"), {"t.parquet": table}, _tasks("t.parquet", "t.parquet"))
    price = table.filter(pa.array(~np.isnan(table.column("price").to_numpy())))
    churn = table.filter(table.column("churn").is_valid())
    stripped = _write(str(tmp_path / "stripped"), {"p.parquet": price, "c.parquet": churn},
                      _tasks("p.parquet", "c.parquet"))
    return shared, stripped, table


def test_unlabelled_rows_are_left_out_of_data_statistics_and_baselines_and_counted(suites):
    shared, stripped, table = suites
    _, scans = checked_scans(shared)
    _, kept = checked_scans(stripped)
    split = np.asarray(table.column("split").to_pylist())
    has_price = ~np.isnan(table.column("price").to_numpy())
    for s in SPLITS:
        assert scans["price"].rows[s] == (split == s).sum()  # every row is counted ...
        assert scans["price"].labelled[s] == (has_price & (split == s)).sum() == kept["price"].rows[s]  # ... and its labels
        assert scans["churn"].labelled[s] == kept["churn"].rows[s] < scans["churn"].rows[s]
    mine = load_tasks(shared, load_suite_spec(shared).tasks, {})
    for task in load_suite_spec(stripped).tasks:
        alone = load_task(stripped, task)
        for s in SPLITS:
            np.testing.assert_array_equal(mine[task.name].x[s], alone.x[s])
            np.testing.assert_array_equal(mine[task.name].y[s], alone.y[s])
    for mode in ("suite", "task"):  # the target's statistics, and the features' (pooled over the tasks' labelled rows)
        assert plan_preprocessing(scans, mode) == plan_preprocessing(kept, mode)
    preps = plan_preprocessing(scans, "suite")
    assert baseline_metrics(shared, preprocessing=preps) == baseline_metrics(stripped, preprocessing=preps)
    for task in load_suite_spec(shared).tasks:  # read in batches (evaluation, streamed tasks): the same rows
        y = torch.cat([y for _, y in split_batches(shared, task, "test", preps[task.name], batch_rows=7)])
        np.testing.assert_array_equal(y.numpy(), preps[task.name].apply(mine[task.name]).y["test"])


def test_tasks_that_share_a_file_read_it_once(suites, monkeypatch):
    shared, _, _ = suites
    reads = []
    real = tasks_module.read_file
    monkeypatch.setattr(tasks_module, "read_file", lambda d, t: reads.append(t.path) or real(d, t))
    data = load_tasks(shared, load_suite_spec(shared).tasks, {})
    assert reads == ["t.parquet"] and set(data) == {"price", "churn"}


def test_a_task_with_no_labelled_train_rows_is_named(suites):
    shared, _, table = suites
    train = np.asarray(table.column("split").to_pylist()) == "train"
    price = np.where(train, np.nan, table.column("price").to_numpy())
    pq.write_table(table.set_column(3, "price", pa.array(price)), os.path.join(shared, "t.parquet"))
    assert validate_suite(shared) == [f"{shared}/t.parquet: task 'price' has no labelled rows in split 'train' "
                                      f"(target column 'price' is null in all {train.sum()})"]


def test_missing_feature_values_are_an_error_unless_imputed_with_the_pooled_train_mean(suites):
    shared, _, table = suites
    x1 = table.column("x1").to_numpy().copy()
    x1[[0, 7, 13]] = np.nan  # rows 0 and 13 train, 7 val
    pq.write_table(table.set_column(1, "x1", pa.array(x1)), os.path.join(shared, "t.parquet"))
    problems = validate_suite(shared)
    assert len(problems) == 2 and all("feature column 'x1' has" in p and "data.impute: mean" in p for p in problems)
    assert validate_suite(shared, impute=True) == []
    _, scans = checked_scans(shared, impute=True)
    preps = plan_preprocessing(scans, "suite", impute=True)
    train = (np.asarray(table.column("split").to_pylist()) == "train")
    rows = np.concatenate([np.flatnonzero(train & ~np.isnan(table.column("price").to_numpy())),
                           np.flatnonzero(train & table.column("churn").is_valid().to_numpy(zero_copy_only=False))])
    pooled = np.nanmean(x1[rows].astype(np.float32))  # over both tasks' labelled train rows, the gaps skipped
    assert preps["price"].feature_fill[1] == pytest.approx(pooled, rel=1e-6) == preps["churn"].feature_fill[1]
    data = preps["price"].apply(load_task(shared, load_suite_spec(shared).tasks[0]))
    assert np.isfinite(data.x["train"]).all() and np.isfinite(data.x["val"]).all()
    assert data.x["train"][0, 1] == pytest.approx(0.0, abs=1e-6)  # the mean, standardised
    off = plan_preprocessing(scans, "off", impute=True)["price"]  # raw units: the task's own train mean
    assert off.inputs(np.array([[np.nan, np.nan, 1.0]], dtype=np.float32))[0, :2] == pytest.approx(off.feature_fill[:2])


def test_moments_skip_missing_values_column_by_column():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(500, 2)) + [3.0, -1.0]
    values[rng.random(500) < 0.2, 0] = np.nan
    moments = Moments(2)
    for chunk in np.array_split(values, 9):
        moments.add(chunk)
    assert moments.n.tolist() == [np.isfinite(values[:, 0]).sum(), 500]
    np.testing.assert_allclose(moments.mean, np.nanmean(values, axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), np.nanstd(values, axis=0), rtol=1e-9)


def test_a_scan_counts_labelled_rows_of_a_seeded_split_as_the_load_sees_them(tmp_path):
    """No split column: the seeded split is drawn over every row, so labels do not move rows
    between splits, and the scan's labelled counts are the loaded rows."""
    table = _table(np.random.default_rng(5)).drop_columns(["split"])
    suite = _write(str(tmp_path / "seeded"), {"t.parquet": table}, _tasks("t.parquet", "t.parquet"))
    for task in load_suite_spec(suite).tasks:
        scan, data = scan_task(suite, task, batch_rows=17), load_task(suite, task)
        assert scan.labelled == {s: len(data.y[s]) for s in SPLITS}
        assert sum(scan.rows.values()) == ROWS > sum(scan.labelled.values())
        np.testing.assert_allclose(TaskPrep.of_scan(scan).feature_mean, TaskPrep.fit(data).feature_mean, rtol=1e-6)
