"""The driver's streamed pass over task files: the same facts as the whole table, batch by batch."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import Moments, scan_task
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.data.validate import validate_suite
from distributed_mtml.models import TaskShape


def test_moments_combined_batch_by_batch_equal_one_pass_even_with_a_large_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(10_001, 3)) * [1e-3, 1.0, 50.0] + [1e6, 0.0, -7.0]
    moments = Moments(3)
    for chunk in np.array_split(values, 37):
        moments.add(chunk)
    assert moments.n.tolist() == [len(values)] * 3
    np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), values.std(axis=0), rtol=1e-9)
    constant = Moments(1)
    constant.add(np.full(5, 3.0))
    assert constant.std()[0] == 1.0  # nothing to scale by


@pytest.mark.parametrize("suite", ["seed", "raw"])
def test_a_scan_in_small_batches_knows_what_the_whole_table_says(request, tmp_path, suite):
    """Rows per split, class names, shapes and the standardisation statistics from 17-row
    batches over a file of several row groups equal those of the table read whole (the raw
    suite has no split column: the seeded split is followed row by row)."""
    suite_dir = request.getfixturevalue("seed_suite" if suite == "seed" else "raw_suite")
    for task in load_suite_spec(suite_dir).tasks:
        path = f"{suite_dir}/{task.path}"
        pq.write_table(pq.read_table(path), path, row_group_size=50)  # several row groups
        scan = scan_task(suite_dir, task, batch_rows=17)
        data = load_task(suite_dir, task)
        assert scan.rows == {s: len(data.y[s]) for s in SPLITS}
        assert TaskShape.of_scan(scan) == TaskShape.of(data)
        assert scan.class_names() == data.classes
        streamed, whole = TaskPrep.of_scan(scan), TaskPrep.fit(data)
        np.testing.assert_allclose(streamed.feature_mean, whole.feature_mean, rtol=1e-9)
        np.testing.assert_allclose(streamed.feature_std, whole.feature_std, rtol=1e-9)
        assert streamed.target_mean == pytest.approx(whole.target_mean, rel=1e-9, abs=1e-12)
        assert streamed.target_std == pytest.approx(whole.target_std, rel=1e-9)


def test_problems_found_in_a_late_batch_are_reported(seed_suite):
    """A bad value in the last row of a file read in small batches is still found."""
    task = load_suite_spec(seed_suite).tasks[0]
    path = f"{seed_suite}/{task.path}"
    table = pq.read_table(path)
    x0 = table.column("x0").to_numpy().copy()
    x0[-1] = np.nan
    labels = table.column("y").to_numpy().copy()
    labels[-2] = 7
    table = table.set_column(table.column_names.index("x0"), "x0", pa.array(x0))
    table = table.set_column(table.column_names.index("y"), "y", pa.array(labels))
    pq.write_table(table, path, row_group_size=30)
    problems = validate_suite(seed_suite)
    assert any("feature column 'x0' has 1 missing" in p for p in problems)
    assert any("has label 7 outside 0..1" in p for p in problems)


@pytest.mark.parametrize("held", [True, False])
def test_streamed_metrics_equal_the_whole_split_and_auc_is_within_its_stated_bound(monkeypatch, held):
    """Held (the split within EXACT_ROWS), every metric is exact; past it, all but AUC are, and
    AUC is within its bins' bound."""
    import torch

    from distributed_mtml import metrics
    from distributed_mtml.data.prepare import TaskPrep
    from distributed_mtml.metrics import AUC_BINS, StreamedMetrics, task_metrics

    if not held:
        monkeypatch.setattr(metrics, "EXACT_ROWS", 1000)

    g = torch.Generator().manual_seed(0)
    for shape, output, target, prep in [
        (TaskShape("c", "classification", 3, 3), torch.randn(5000, 3, generator=g), torch.randint(0, 3, (5000,), generator=g), None),
        (TaskShape("b", "classification", 3, 2), torch.randn(5000, 2, generator=g), torch.randint(0, 2, (5000,), generator=g), None),
        (TaskShape("r", "regression", 3), torch.randn(5000, 1, generator=g), torch.randn(5000, generator=g),
         TaskPrep(target_mean=1000.0, target_std=50.0)),
    ]:
        streamed = StreamedMetrics(shape, prep)
        for o, t in zip(output.split(777), target.split(777)):
            streamed.add(o, t)
        got, want = streamed.result(), task_metrics(shape, output, target, prep)
        assert set(got) == set(want)
        for key in want:
            tolerance = 2 / AUC_BINS if key == "auc" and not held else 1e-9
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=tolerance), key


@pytest.mark.parametrize("suite", ["seed", "raw"])
def test_split_batches_are_the_split_as_the_model_sees_it(request, suite):
    """Read in batches of 7 rows (filtered by the split column, or by the seeded split), a split
    is the in-memory split's rows in order, prepared the same way."""
    import torch

    from distributed_mtml.data.stream import split_batches

    suite_dir = request.getfixturevalue("seed_suite" if suite == "seed" else "raw_suite")
    for task in load_suite_spec(suite_dir).tasks:
        data = load_task(suite_dir, task)
        prep = TaskPrep.fit(data)
        whole = prep.apply(data)
        for split in SPLITS:
            parts = list(split_batches(suite_dir, task, split, prep, batch_rows=7))
            assert all(len(y) == 7 for _, y in parts[:-1])
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            np.testing.assert_allclose(x.numpy(), whole.x[split], rtol=1e-6)
            np.testing.assert_array_equal(y.numpy(), whole.y[split])
