import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from distributed_mtml.data.generators import GENERATORS, make_suite
from distributed_mtml.data.suite import SPLITS
from distributed_mtml.data.tasks import load_suite_spec, load_task
from distributed_mtml.data.validate import validate_suite
from distributed_mtml.errors import InputError


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_writes_a_valid_suite(tmp_path, name):
    make_suite(name, str(tmp_path), {"rows": 60})
    assert validate_suite(str(tmp_path)) == []
    spec = load_suite_spec(str(tmp_path))
    for task in spec.tasks:
        data = load_task(str(tmp_path), task)
        assert sum(len(data.y[s]) for s in SPLITS) == 60
        assert all(len(data.y[s]) > 0 for s in SPLITS)


def test_seed_example_matches_the_article():
    spec, tables = GENERATORS["seed-example"].make(GENERATORS["seed-example"].options(rows=300))
    kinds = {t.name: (t.type, t.num_classes) for t in spec.tasks}
    assert kinds == {"classify": ("classification", 2), "regress": ("regression", None)}
    assert tables["classify"].num_columns == 12  # 10 features, target, split
    labels = set(tables["classify"].column("y").to_pylist())
    assert labels == {0, 1}


def test_seed_example_is_reproducible_and_seed_dependent():
    make = lambda seed: GENERATORS["seed-example"].make(GENERATORS["seed-example"].options(rows=100, seed=seed))[1]  # noqa: E731
    a, b, c = make(3), make(3), make(4)
    assert a["regress"].equals(b["regress"])
    assert not a["regress"].equals(c["regress"])


def _mmoe_weights(opts):
    """Recovers each task's weight vector by least squares on noise-free, sine-free labels."""
    spec, tables = GENERATORS["mmoe"].make(opts)
    ws = []
    for task in spec.tasks:
        t = tables[task.name]
        x = np.column_stack([t.column(f"x{i}").to_numpy() for i in range(opts.features)]).astype(np.float64)
        ws.append(np.linalg.lstsq(x, t.column("y").to_numpy().astype(np.float64), rcond=None)[0])
    return ws


@pytest.mark.parametrize("p", [-0.5, -0.3, 0.0, 0.5, 0.9])
def test_mmoe_pairwise_correlation_is_exact_for_three_tasks(p):
    opts = GENERATORS["mmoe"].options(tasks=3, correlation=p, features=8, rows=400, sines=0, noise=0.0)
    ws = _mmoe_weights(opts)
    for i in range(3):
        assert np.linalg.norm(ws[i]) == pytest.approx(1.0, abs=1e-4)
        for j in range(i + 1, 3):
            cos = ws[i] @ ws[j] / (np.linalg.norm(ws[i]) * np.linalg.norm(ws[j]))
            assert cos == pytest.approx(p, abs=1e-4)


def test_mmoe_refuses_a_correlation_no_three_vectors_can_have():
    from distributed_mtml.errors import InputError

    with pytest.raises(InputError, match="'correlation'.*-1/\\(n-1\\).*n=3"):
        GENERATORS["mmoe"].make(GENERATORS["mmoe"].options(tasks=3, correlation=-0.6, features=8))


def test_seed_example_variant_keeps_seed_0_data_and_draws_new_tasks():
    g = GENERATORS["seed-example"]
    base = g.make(g.options(rows=60, seed=3))[1]["regress"].column("y").to_numpy()
    same = g.make(g.options(rows=60, seed=3, variant=0))[1]["regress"].column("y").to_numpy()
    other = g.make(g.options(rows=60, seed=3, variant=1))[1]["regress"].column("y").to_numpy()
    assert np.array_equal(base, same) and not np.allclose(base, other)


def test_sinusoid_ranges():
    spec, tables = GENERATORS["sinusoid"].make(GENERATORS["sinusoid"].options(tasks=30, rows=50))
    for table in tables.values():
        x = table.column("x0").to_numpy()
        y = table.column("y").to_numpy()
        assert x.min() >= -5 and x.max() <= 5
        assert np.abs(y).max() <= 5.0
    amplitudes = [np.abs(t.column("y").to_numpy()).max() for t in tables.values()]
    assert max(amplitudes) > 2.5 and min(amplitudes) < 2.5  # amplitudes spread over U[0.1, 5]


def test_unknown_generator_and_bad_option_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown generator 'nope'"):
        make_suite("nope", str(tmp_path))
    with pytest.raises(InputError, match="'rows'"):
        make_suite("seed-example", str(tmp_path), {"rows": -5})
    with pytest.raises(InputError, match="must be at least 'tasks' \+ 'groups'"):
        make_suite("mmoe", str(tmp_path), {"tasks": 5, "features": 4})


def test_suite_read_through_a_pyarrow_uri_and_a_parquet_directory(tmp_path, seed_suite):
    # Move one task into a directory of two Parquet parts and point to it by file:// URI.
    spec = load_suite_spec(seed_suite)
    table = pq.read_table(f"{seed_suite}/regress.parquet")
    parts = tmp_path / "regress_parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 100), parts / "a.parquet")
    pq.write_table(table.slice(100), parts / "b.parquet")
    raw = yaml.safe_load(open(f"{seed_suite}/suite.yaml"))
    raw["tasks"][1]["path"] = f"file://{parts}"
    yaml.safe_dump(raw, open(f"{seed_suite}/suite.yaml", "w"))
    assert validate_suite(f"file://{seed_suite}") == []
    data = load_task(f"file://{seed_suite}", load_suite_spec(seed_suite).tasks[1])
    assert sum(len(data.y[s]) for s in SPLITS) == table.num_rows
    assert spec.tasks[1].name == "regress"


def test_features_default_to_numeric_columns_but_target_and_split(seed_suite):
    spec = load_suite_spec(seed_suite)
    data = load_task(seed_suite, spec.tasks[0])
    assert data.features == [f"x{i}" for i in range(10)]
    assert data.x["train"].dtype == np.float32 and data.y["train"].dtype == np.int64
    assert math.isclose(len(data.y["train"]) / 200, 0.7, abs_tol=0.01)


def test_mmoe_groups_correlate_within_and_not_across():
    opts = GENERATORS["mmoe"].options(tasks=4, groups=2, correlation=0.9, features=8, rows=400, sines=0, noise=0.0)
    ws = _mmoe_weights(opts)
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    assert cos(ws[0], ws[1]) == pytest.approx(0.9, abs=1e-4) and cos(ws[2], ws[3]) == pytest.approx(0.9, abs=1e-4)
    assert cos(ws[0], ws[2]) == pytest.approx(0.0, abs=1e-4) and cos(ws[1], ws[3]) == pytest.approx(0.0, abs=1e-4)


def test_a_table_without_split_column_gets_the_seeded_split(tmp_path):
    from conftest import write_raw_suite

    suite = write_raw_suite(str(tmp_path / "a"), rows=200)
    spec = load_suite_spec(suite)
    first, again = (load_task(suite, spec.tasks[0]) for _ in range(2))
    assert [len(first.y[s]) for s in SPLITS] == [140, 30, 30]  # 70/15/15
    assert np.array_equal(first.x["val"], again.x["val"])  # the same rows every time
    other = load_task(suite, spec.tasks[1])  # seeded by task name too: another permutation
    assert not np.array_equal(first.x["val"][:, 0], other.x["val"][:, 0])
    moved = write_raw_suite(str(tmp_path / "b"), rows=200, extra="split_fractions: [0.5, 0.25, 0.25]\nsplit_seed: 7\n")
    data = load_task(moved, load_suite_spec(moved).tasks[0])
    assert [len(data.y[s]) for s in SPLITS] == [100, 50, 50]
    assert validate_suite(suite) == [] and validate_suite(moved) == []


def test_seeded_split_problems_are_named(tmp_path):
    from conftest import write_raw_suite

    tiny = write_raw_suite(str(tmp_path / "tiny"), rows=3)
    assert any("no split column; split_fractions [0.7, 0.15, 0.15] of 3 rows: split 'val' is empty" in p
               for p in validate_suite(tiny))
    named = write_raw_suite(str(tmp_path / "named"))
    raw = yaml.safe_load(open(f"{named}/suite.yaml"))
    raw["tasks"][0]["split_column"] = "fold"  # named explicitly: it must exist
    raw["split_fractions"] = [0.5, 0.5, 0.5]
    yaml.safe_dump(raw, open(f"{named}/suite.yaml", "w"))
    problems = validate_suite(named)
    assert any("split_fractions" in p and "sum to 1" in p for p in problems)
    raw["split_fractions"] = [0.8, 0.1, 0.1]
    yaml.safe_dump(raw, open(f"{named}/suite.yaml", "w"))
    assert validate_suite(named) == [f"{named}/cls.parquet: split column 'fold' not found"]


def test_string_labels_map_to_classes_in_sorted_order(tmp_path):
    from conftest import write_raw_suite

    suite = write_raw_suite(str(tmp_path / "s"))
    task = load_suite_spec(suite).tasks[0]
    data = load_task(suite, task)
    assert data.classes == ["no", "yes"] and data.num_classes == 2
    table = pq.read_table(f"{suite}/cls.parquet")
    b, label = table.column("b").to_numpy(), table.column("label").to_pylist()
    assert set(label) == {"no", "yes"} and all((bi > 0) == (lab == "yes") for bi, lab in zip(b, label))
    for s in SPLITS:  # class 1 is "yes", which is b > 0 (feature column 1)
        assert np.array_equal(data.y[s] == 1, data.x[s][:, 1] > 0)
    raw = yaml.safe_load(open(f"{suite}/suite.yaml"))
    raw["tasks"][0]["num_classes"] = 3
    yaml.safe_dump(raw, open(f"{suite}/suite.yaml", "w"))
    assert validate_suite(suite) == [f"{suite}/cls.parquet: target column 'label' has 2 class names, num_classes says 3"]


def test_standardisation_uses_the_train_split_only_and_metrics_keep_the_targets_units(tmp_path):
    import torch
    from conftest import write_raw_suite

    from distributed_mtml.data.prepare import TaskPrep
    from distributed_mtml.metrics import task_metrics
    from distributed_mtml.models import TaskShape

    suite = write_raw_suite(str(tmp_path / "s"))
    data = load_task(suite, load_suite_spec(suite).tasks[1])
    prep = TaskPrep.fit(data)
    assert prep.feature_mean == pytest.approx(data.x["train"].mean(0).tolist(), rel=1e-5)
    assert prep.target_std == pytest.approx(float(data.y["train"].std()), rel=1e-5)
    shifted = load_task(suite, load_suite_spec(suite).tasks[1])
    shifted.x["val"] += 1e6  # val and test never shape the statistics
    shifted.y["test"] += 1e6
    assert TaskPrep.fit(shifted) == prep
    scaled = prep.apply(data)
    assert np.abs(scaled.x["train"].mean(0)).max() < 1e-4 and np.allclose(scaled.x["train"].std(0), 1, atol=1e-4)
    assert abs(scaled.y["train"].mean()) < 1e-4
    y = torch.from_numpy(scaled.y["test"])
    pred = y + 0.1  # off by 0.1 standard deviations on the model's scale
    metrics = task_metrics(TaskShape.of(data), pred[:, None], y, prep)
    assert metrics["mse"] == pytest.approx((0.1 * prep.target_std) ** 2, rel=1e-4)  # in the price's units
    assert metrics["loss"] == pytest.approx(0.01, rel=1e-4)  # on the standardised scale
    off = TaskPrep.fit(data, standardize=False)
    assert off.feature_mean is None and np.array_equal(off.apply(data).x["test"], data.x["test"])


def test_a_large_suite_is_written_chunk_by_chunk_as_row_groups_of_the_same_tasks(tmp_path, monkeypatch):
    """Above one chunk, rows are drawn and written a chunk at a time (bounded memory); every chunk
    is more rows of the same tasks: the weights recovered from the last chunk's rows are the
    first chunk's, while the rows themselves differ."""
    from distributed_mtml.data import generators

    monkeypatch.setattr(generators, "GENERATE_CHUNK_ROWS", 100)
    make_suite("mmoe", str(tmp_path), {"rows": 350, "tasks": 3, "features": 8, "sines": 0, "noise": 0.0})
    assert validate_suite(str(tmp_path)) == []
    f = pq.ParquetFile(tmp_path / "task1.parquet")
    assert f.metadata.num_rows == 350 and f.metadata.num_row_groups == 4
    groups = [f.read_row_group(i) for i in (0, 3)]
    fits = []
    for g in groups:
        x = np.column_stack([g.column(f"x{i}").to_numpy() for i in range(8)]).astype(np.float64)
        fits.append(np.linalg.lstsq(x, g.column("y").to_numpy().astype(np.float64), rcond=None)[0])
    np.testing.assert_allclose(fits[0], fits[1], atol=1e-4)
    assert not np.allclose(groups[0].column("x0").to_numpy()[:50], groups[1].column("x0").to_numpy())
    counts = {s: sum(1 for v in pq.read_table(tmp_path / "task1.parquet").column("split").to_pylist() if v == s)
              for s in SPLITS}
    assert counts["train"] == sum(int(n * 0.7) for n in (100, 100, 100, 50))


def test_a_column_prepared_alone_is_bit_identical_to_the_whole_rows():
    """Streamed windows are prepared a column at a time (`input_column`), in-memory tasks whole
    (`inputs`): the same float64 arithmetic, so the same float32 values, bit for bit."""
    from distributed_mtml.data.prepare import TaskPrep

    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((1000, 5)) * 7 + 3).astype(np.float32)
    prep = TaskPrep(feature_mean=rng.standard_normal(5).tolist(), feature_std=(rng.random(5) + 0.5).tolist())
    by_column = np.empty_like(raw)
    for i in range(5):
        by_column[:, i] = prep.input_column(i, raw[:, i])
    assert np.array_equal(by_column, prep.inputs(raw))
    column = raw[:, 0]
    assert TaskPrep().input_column(0, column) is column  # not standardised: as it is
