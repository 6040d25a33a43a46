"""Property-based tests (hypothesis): the aggregation rules' guarantees on random gradients, and
suite validation on random tables with at most one planted defect."""

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distributed_mtml.aggregation import combine
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.errors import InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def task_gradients(draw, min_tasks: int = 2, max_tasks: int = 5):
    k = draw(st.integers(min_tasks, max_tasks))
    p = draw(st.integers(1, 12))
    values = draw(arrays(np.float64, (k, p), elements=st.floats(-10, 10, allow_nan=False, width=64)))
    norms = np.linalg.norm(values, axis=1)
    assume(norms.min() > 1e-2)  # a zero task gradient makes directions undefined
    return torch.from_numpy(values)


def _scale(grads: torch.Tensor) -> float:
    return float((grads * grads).sum(1).max())


def _independent(grads: torch.Tensor) -> bool:
    """Linearly independent task gradients (K <= P, as with any real network): the case where
    the iterative solvers' answers are exact to the tolerances asserted here."""
    units = grads / grads.norm(dim=1, keepdim=True)
    return float(torch.linalg.eigvalsh(units @ units.T).min()) > 1e-3


@SETTINGS
@given(task_gradients(), st.sampled_from(["mean", "pcgrad", "cagrad", "mgda", "upgrad", "imtl", "dualproj",
                                           "aligned_mtl", "config", "gradvac"]),
       st.floats(0.01, 100.0))
def test_methods_are_scale_equivariant(grads, method, s):
    """Multiplying every gradient by s > 0 multiplies the update by s: no method depends on
    the loss scale's absolute size (Nash-MTL and FairGrad choose their own step size, which
    is the point of them). CAGrad is left out at (near) Pareto-stationary points,
    where zero is almost in the gradients' convex hull: there the dual's recovered direction
    g_w / |g_w| is ill-conditioned (a known limit of the dual form, noted in the README)."""
    if method in ("mgda", "upgrad", "cagrad", "dualproj"):  # exact for independent gradients
        assume(_independent(grads))
    if method == "cagrad":
        hull, _ = combine(grads, "mgda", seed=0)
        assume(float(hull @ hull) > 1e-2 * _scale(grads))
    d, _ = combine(grads, method, seed=3)
    ds, _ = combine(grads * s, method, seed=3)
    assert torch.allclose(ds, d * s, rtol=1e-4, atol=1e-6 * s * _scale(grads) ** 0.5)


@SETTINGS
@given(task_gradients())
def test_mgda_is_the_min_norm_point_of_the_hull(grads):
    """Weights on the simplex, and the optimality condition of the min-norm point: every task
    gradient has at least |d|^2 along d. (Dependent gradients, K > P, can put zero inside the
    hull, which the fixed-budget solver approaches too slowly for this tolerance.)"""
    assume(_independent(grads))
    d, w = combine(grads, "mgda", seed=0)
    assert bool((w >= -1e-9).all()) and abs(float(w.sum()) - 1) < 1e-6
    along = grads @ d
    assert bool((along >= (d @ d) - 1e-3 * _scale(grads)).all())


@SETTINGS
@given(task_gradients())
def test_upgrad_update_conflicts_with_no_task(grads):
    """Up to its regularisation: task j's derivative at least -reg_eps tr(G) w_j (its weight w_j),
    with reg_eps 1e-4, plus 1e-9 of the scale for rounding; dependent gradients (K > P) too, since
    the box QP is solved exactly (one NNLS problem)."""
    d, w = combine(grads, "upgrad", seed=0)
    trace = float((grads.double() ** 2).sum())
    assert bool((grads.double() @ d.double() >= -1e-4 * trace * w.double() - 1e-9 * _scale(grads)).all())


@SETTINGS
@given(task_gradients(2, 2))
def test_pcgrad_with_two_tasks_conflicts_with_neither(grads):
    d, _ = combine(grads, "pcgrad", seed=0)
    assert bool((grads @ d >= -1e-6 * _scale(grads)).all())


@SETTINGS
@given(task_gradients())
def test_cagrad_with_c_zero_is_the_mean_and_mean_is_the_mean(grads):
    mean = grads.mean(0)
    assert torch.allclose(combine(grads, "mean", seed=0)[0], mean)
    assert torch.allclose(combine(grads, "cagrad", seed=0, c=0.0)[0], mean, atol=1e-6 * _scale(grads) ** 0.5)


def _cagrad_optimum(grads: torch.Tensor, c: float) -> tuple[float, float]:
    """(dual objective at CAGrad's solution, worst task improvement of its update), both from the
    Jacobian itself, not from the solver's scaled Gram. Strong duality: they agree exactly at the
    optimum, and any update in the ball improves the worst task by at most the dual's minimum."""
    j = grads.double()
    d, w = combine(j, "cagrad", seed=0, c=c)
    k, g0 = len(j), j.mean(0)
    inner = (1 + c * c) * w - 1.0 / k  # (s / |g_w|) w*: the dual's weights, up to their sum
    w_star = inner / inner.sum()
    dual = float(w_star @ (j @ g0) + c * g0.norm() * (j.T @ w_star).norm())
    return dual, float((j @ (d * (1 + c * c))).min())


@SETTINGS
@given(task_gradients(), st.floats(0.1, 1.0))
def test_cagrad_closes_its_duality_gap(grads, c):
    """CAGrad's weights minimise its dual: the worst task improvement of the update equals the
    dual objective at the weights (a certificate of optimality). Left out where zero is almost
    in the hull (Pareto-stationary), where the dual is not smooth."""
    hull, _ = combine(grads, "mgda", seed=0)
    assume(float(hull @ hull) > 1e-2 * _scale(grads))
    dual, primal = _cagrad_optimum(grads, c)
    assert abs(dual - primal) <= 1e-9 * max(abs(dual), float(grads.mean(0).norm() ** 2))


@pytest.mark.parametrize("spread", [10.0, 100.0, 1e3, 1e4])
def test_cagrad_matches_an_independent_solver_on_badly_scaled_gradients(spread):
    """Against SLSQP on the paper's dual (best of three starts), on gradients whose norms spread
    over `spread`: our dual objective is within 1e-9 of the reference's (or below it: SLSQP's
    tolerance is absolute), our duality gap is closed, and our update conflicts with no task
    unless the reference's does too."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(int(spread))
    for _ in range(60):
        k, c = int(rng.integers(2, 6)), 0.4
        j = rng.normal(size=(k, 50))
        j *= np.exp(rng.uniform(0, np.log(spread), size=(k, 1))) / np.linalg.norm(j, axis=1, keepdims=True)
        g0 = j.mean(0)
        objective = lambda w, j=j, g0=g0, c=c: w @ (j @ g0) + c * np.linalg.norm(g0) * np.linalg.norm(j.T @ w)  # noqa: E731
        ref = min((minimize(objective, rng.dirichlet(np.ones(k)), method="SLSQP", bounds=[(0, 1)] * k,
                            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                            options={"ftol": 1e-16, "maxiter": 1000}) for _ in range(3)), key=lambda r: r.fun)
        dual, primal = _cagrad_optimum(torch.from_numpy(j), c)
        tol = 1e-9 * max(abs(ref.fun), float(g0 @ g0))
        # ours is no worse than the reference, and optimal: no update in the ball does better
        assert dual <= ref.fun + tol and primal >= dual - tol, (dual, primal, ref.fun)
        d_ref = g0 + c * np.linalg.norm(g0) * (j.T @ ref.x) / np.linalg.norm(j.T @ ref.x)
        if (j @ d_ref).min() >= 0:
            assert primal >= -tol


@pytest.mark.parametrize("seed", [964, 2598])
def test_cagrad_is_exact_where_projected_gradient_stalls_on_a_wrong_support(seed):
    """Two of 3,000 random 5-task Jacobians with gradient norms spread over 1e4 (drawn as the test
    above draws them) left projected gradient on a support whose face has no stationary point:
    the duality gap was 6.4e-4 |g0|^2. Closed to 1e-9 by trying every support."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(5, 50))
    j *= np.exp(rng.uniform(0, np.log(1e4), size=(5, 1))) / np.linalg.norm(j, axis=1, keepdims=True)
    dual, primal = _cagrad_optimum(torch.from_numpy(j), 0.4)
    g0 = j.mean(0)
    assert abs(dual - primal) <= 1e-9 * float(g0 @ g0)


@SETTINGS
@given(task_gradients(), st.permutations(range(5)))
def test_order_free_methods_ignore_task_order(grads, permutation):
    order = [i for i in permutation if i < len(grads)]
    independent = _independent(grads)
    # IMTL-G's equal-projection system has an exact solution only for independent gradients
    # (K <= P, as with real networks); otherwise it is a least-squares compromise. UPGrad's
    # projections onto the dual cone are ill-conditioned there too: for nearly opposite
    # gradients (g and -3g + 1e-7 noise) the cone is almost a hyperplane, the weights reach 1e6
    # and the update depends on the noise (hypothesis found such a case).
    for method in ("mgda", "upgrad", "imtl") if independent else ("mgda",):
        d, _ = combine(grads, method, seed=0)
        dp, _ = combine(grads[order], method, seed=0)
        assert torch.allclose(d, dp, rtol=1e-4, atol=1e-5 * _scale(grads) ** 0.5), method


@SETTINGS
@given(task_gradients(), st.floats(0.1, 10))
def test_imtl_with_collinear_gradients_is_the_mean(grads, s):
    """Collinear gradients share one unit vector: every update projects equally, and the
    weights stay the mean's whatever the order."""
    collinear = torch.stack([grads[0] * (s if i % 2 else 1 / (i + 1)) for i in range(len(grads))])
    d, w = combine(collinear, "imtl", seed=0)
    assert torch.allclose(w, torch.full_like(w, 1 / len(w)), atol=1e-6)


# --- suite validation -----------------------------------------------------------------------

DEFECTS = {
    None: None,
    "nan_feature": "feature column 'x0' has 1 missing (NaN or null) value(s)",
    "label_out_of_range": "has label",
    "text_feature": "feature column 'x1' is not numeric",
    "empty_split": "split 'val' is empty",
    "unknown_split": "has values ['holdout']",
}


@st.composite
def task_tables(draw):
    """A classification table that is valid by construction, and at most one defect planted."""
    rows = draw(st.integers(6, 40))
    features = draw(st.integers(2, 4))
    classes = draw(st.integers(2, 5))
    columns = {f"x{i}": draw(arrays(np.float64, rows, elements=st.floats(-1e6, 1e6, allow_nan=False)))
               for i in range(features)}
    labels = draw(arrays(np.int64, rows, elements=st.integers(0, classes - 1)))
    split = ["train", "val", "test"] * (rows // 3) + ["train"] * (rows % 3)
    defect = draw(st.sampled_from(list(DEFECTS)))
    at = draw(st.integers(0, rows - 1))
    if defect == "nan_feature":
        columns["x0"][at] = np.nan
    elif defect == "label_out_of_range":
        labels[at] = draw(st.sampled_from([-1, classes, classes + 7]))
    elif defect == "text_feature":
        columns["x1"] = columns["x1"].astype(str)
    elif defect == "empty_split":
        split = ["train" if s == "val" else s for s in split]
    elif defect == "unknown_split":
        split[1] = "holdout"  # row 1 is always 'val': val keeps its other rows only if rows >= 6
    table = pa.table({**columns, "y": labels, "split": split})
    return table, classes, features, defect


@SETTINGS
@given(task_tables())
def test_validation_accepts_valid_tables_and_names_each_planted_defect(case):
    table, classes, features, defect = case
    with tempfile.TemporaryDirectory() as suite:
        pq.write_table(table, os.path.join(suite, "t.parquet"))
        spec = {"name": "random", "tasks": [{"name": "t", "type": "classification", "path": "t.parquet",
                                              "target": "y", "num_classes": classes,
                                              "features": [f"x{i}" for i in range(features)]}]}
        with open(os.path.join(suite, "suite.yaml"), "w") as f:
            yaml.safe_dump(spec, f)
        if defect is None:
            assert [t.name for t in checked_suite(suite).tasks] == ["t"]
            return
        with pytest.raises(InputError) as err:
            checked_suite(suite)
        assert all(line.startswith(os.path.join(suite, "")) for line in err.value.problems)
        assert any(DEFECTS[defect] in line for line in err.value.problems), err.value.problems
