"""The one 95% interval every table and curve uses."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("n", [2, 5, 12, 30])
def test_intervals_are_students_t_at_every_sample_size(n):
    """`stats.mean_ci` against scipy's t interval, at sizes where a normal 1.96 would be 4-73% narrower."""
    from scipy import stats as scipy_stats

    from distributed_mtml.stats import mean_ci

    values = np.random.default_rng(n).normal(3.0, 2.0, n)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    mean, half = mean_ci(values.tolist())
    assert mean == pytest.approx(values.mean()) and half == pytest.approx((high - low) / 2, rel=1e-9)
    assert np.isnan(mean_ci([1.0])[1])
