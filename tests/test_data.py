import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distributed_mtml.data.generators import GENERATORS, make_suite
from distributed_mtml.data.suite import SPLITS, load_suite_spec, load_task
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
