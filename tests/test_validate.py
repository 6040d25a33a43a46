"""Every validation case of the suite format: one clear line naming file and column/key."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distributed_mtml.data.validate import validate_suite


def _edit_yaml(suite, fn):
    path = f"{suite}/suite.yaml"
    raw = yaml.safe_load(open(path))
    fn(raw)
    yaml.safe_dump(raw, open(path, "w"))


def _edit_table(suite, name, fn):
    path = f"{suite}/{name}.parquet"
    pq.write_table(fn(pq.read_table(path)), path)


def _set_column(table, name, values):
    return table.set_column(table.column_names.index(name), name, values)


def test_clean_suite_has_no_problems(seed_suite):
    assert validate_suite(seed_suite) == []


def test_missing_suite_yaml(tmp_path):
    assert validate_suite(str(tmp_path)) == [f"{tmp_path}/suite.yaml: file not found"]


def test_missing_data_file(seed_suite):
    import os

    os.remove(f"{seed_suite}/regress.parquet")
    assert validate_suite(seed_suite) == [f"{seed_suite}/regress.parquet: file not found (task 'regress')"]


def test_corrupt_parquet(seed_suite):
    open(f"{seed_suite}/classify.parquet", "wb").write(b"this is not parquet at all")
    (problem,) = validate_suite(seed_suite)
    assert problem.startswith(f"{seed_suite}/classify.parquet: not a readable Parquet file (task 'classify')")


def test_missing_target_and_feature_columns(seed_suite):
    _edit_yaml(seed_suite, lambda r: r["tasks"][0].update(target="label", features=["x0", "x99"]))
    problems = validate_suite(seed_suite)
    assert f"{seed_suite}/classify.parquet: target column 'label' not found" in problems
    assert f"{seed_suite}/classify.parquet: feature column 'x99' not found" in problems


def test_non_numeric_feature(seed_suite):
    _edit_table(seed_suite, "regress", lambda t: _set_column(t, "x3", pa.array(["a"] * t.num_rows)))
    _edit_yaml(seed_suite, lambda r: r["tasks"][1].update(features=["x0", "x3"]))
    assert validate_suite(seed_suite) == [f"{seed_suite}/regress.parquet: feature column 'x3' is not numeric (type string)"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_missing_or_infinite_values(seed_suite, bad):
    """An infinite value is an error; a missing feature value is one unless imputed; a missing
    target is an unlabelled row, no error."""
    def poison(t):
        x = t.column("x2").to_numpy().copy()
        x[5] = bad
        y = t.column("y").to_numpy().copy()
        y[7] = bad
        return _set_column(_set_column(t, "x2", pa.array(x)), "y", pa.array(y))

    _edit_table(seed_suite, "regress", poison)
    where = f"{seed_suite}/regress.parquet"
    assert validate_suite(seed_suite) == ([
        f"{where}: feature column 'x2' has infinite values", f"{where}: target column 'y' has infinite values"]
        if bad == np.inf else [f"{where}: feature column 'x2' has 1 missing (NaN or null) value(s) in task 'regress's "
                               "labelled rows; fill them, or set data.impute: mean"])


def test_class_label_out_of_range(seed_suite):
    def relabel(t):
        y = t.column("y").to_numpy().copy()
        y[0] = 2
        return _set_column(t, "y", pa.array(y))

    _edit_table(seed_suite, "classify", relabel)
    assert validate_suite(seed_suite) == [f"{seed_suite}/classify.parquet: target column 'y' has label 2 outside 0..1"]


def test_empty_split(seed_suite):
    _edit_table(seed_suite, "classify", lambda t: _set_column(t, "split", pa.array(["train"] * t.num_rows)))
    assert validate_suite(seed_suite) == [
        f"{seed_suite}/classify.parquet: split column 'split': split 'val' is empty",
        f"{seed_suite}/classify.parquet: split column 'split': split 'test' is empty",
    ]


def test_duplicate_task_name(seed_suite):
    _edit_yaml(seed_suite, lambda r: r["tasks"][1].update(name="classify"))
    problems = validate_suite(seed_suite)
    assert f"{seed_suite}/suite.yaml: key 'tasks.1.name': duplicate task name 'classify'" in problems


def test_unknown_keys_in_suite_yaml(seed_suite):
    _edit_yaml(seed_suite, lambda r: (r.update(owner="me"), r["tasks"][0].update(weight=2)))
    assert sorted(validate_suite(seed_suite)) == [
        f"{seed_suite}/suite.yaml: unknown key 'owner'",
        f"{seed_suite}/suite.yaml: unknown key 'tasks.0.weight'",
    ]


def test_all_problems_are_reported_at_once(seed_suite):
    import os

    os.remove(f"{seed_suite}/regress.parquet")
    _edit_yaml(seed_suite, lambda r: r["tasks"][0].update(target="nothing"))
    problems = validate_suite(seed_suite)
    assert len(problems) == 2
    assert any("regress.parquet: file not found" in p for p in problems)
    assert any("target column 'nothing' not found" in p for p in problems)


@pytest.mark.ray
def test_with_an_address_each_task_is_scanned_as_a_ray_task_with_the_same_problems(ray_session, seed_suite, capsys):
    """`mtml data validate --address`: the tests' Ray stands for the cluster (a joined one is
    what `ensure_ray` returns to); the lines are the same, in the same order, as in one process."""
    _edit_table(seed_suite, "classify", lambda t: _set_column(t, "x0", pa.array([np.nan] * t.num_rows)))
    _edit_yaml(seed_suite, lambda r: r["tasks"][1].update(target="nothing"))
    alone = validate_suite(seed_suite)
    assert len(alone) == 2 and not capsys.readouterr().out
    assert validate_suite(seed_suite, on_cluster=True) == alone
    assert "[mtml] scanned 2 task file(s) as Ray tasks on 1 node(s)" in capsys.readouterr().out


def test_cli_validate_exit_codes(seed_suite):
    ok = subprocess.run([sys.executable, "-m", "distributed_mtml", "data", "validate", seed_suite], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    _edit_yaml(seed_suite, lambda r: r["tasks"][0].update(target="nothing"))
    bad = subprocess.run([sys.executable, "-m", "distributed_mtml", "data", "validate", seed_suite], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {seed_suite}/classify.parquet: target column 'nothing' not found"


def test_validating_a_suite_many_times_a_task_limit_stays_bounded(tmp_path):
    """`mtml data validate` streams, so its memory is bounded by its buffers, not the table: the
    peak of validating 2 tasks of 1.2M rows (each 78 MB as float32, 165 MB as Arrow reads it
    whole) is that of 2 tasks of 300K rows (where the buffers have reached their size) within a
    quarter of one 1.2M-row task's float32 size."""
    rng = np.random.default_rng(0)
    rows, features, copies = 300_000, 16, 4
    table = pa.table({**{f"x{i}": rng.standard_normal(rows) for i in range(features)}, "y": rng.standard_normal(rows),
                      "split": pa.array(np.array(["train", "val", "test"])[rng.integers(0, 3, rows)]).dictionary_encode()})
    (tmp_path / "small").mkdir()
    (tmp_path / "big" / "t").mkdir(parents=True)
    pq.write_table(table, tmp_path / "small" / "t.parquet", row_group_size=1 << 16)
    for i in range(copies):  # the file four times in a Parquet directory
        os.link(tmp_path / "small" / "t.parquet", tmp_path / "big" / "t" / f"part{i}.parquet")
    for suite, path in (("small", "t.parquet"), ("big", "t")):
        tasks = [{"name": n, "type": "regression", "path": path, "target": "y"} for n in ("a", "b")]
        yaml.safe_dump({"name": suite, "tasks": tasks}, open(tmp_path / suite / "suite.yaml", "w"))

    def growth(suite: str) -> float:
        """Peak resident memory of validating, over that after the imports, in a fresh process."""
        code = ("import distributed_mtml.cli as cli, distributed_mtml.data.validate\n"
                "from distributed_mtml.compat import peak_resident_mb as peak\n"
                f"base = peak(); assert cli.main(['data', 'validate', {suite!r}]) == 0; print(peak() - base)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    small, big = growth(str(tmp_path / "small")), growth(str(tmp_path / "big"))
    assert big - small < copies * rows * (features + 1) * 4 / 2**20 / 4, (small, big)
