"""The trivial predictor: fitted on the train split only, its defining numbers, and the table
mark for a model that does not beat it."""

import math

import numpy as np
import pytest

from distributed_mtml.baseline import baseline_metrics
from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.tasks import load_task
from distributed_mtml.data.validate import checked_suite
from distributed_mtml.report import metrics_table


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trivial") / "suite")
    make_suite("seed-example", path, {"rows": 400, "seed": 3})
    return path


def _labels(suite, name, split):
    (task,) = [t for t in checked_suite(suite).tasks if t.name == name]
    return load_task(suite, task).y[split]


def test_regression_baseline_is_the_train_mean(suite):
    train, test = (_labels(suite, "regress", s).astype(np.float64) for s in ("train", "test"))
    got = baseline_metrics(suite, ("train", "test"))
    assert got["train/regress/r2"] == pytest.approx(0.0, abs=1e-12)  # by construction
    assert got["test/regress/mse"] == pytest.approx(float(np.mean((test - train.mean()) ** 2)), rel=1e-9)
    assert got["test/regress/loss"] == pytest.approx(got["test/regress/mse"], rel=1e-6)


def test_classification_baseline_is_the_majority_class_and_the_prior_log_loss(suite):
    train, val = _labels(suite, "classify", "train"), _labels(suite, "classify", "val")
    prior = np.bincount(train, minlength=2) / len(train)
    got = baseline_metrics(suite, ("val",))
    assert got["val/classify/accuracy"] == pytest.approx(float(np.mean(val == prior.argmax())))
    assert got["val/classify/loss"] == pytest.approx(float(-np.mean(np.log(prior[val]))), rel=1e-6)
    assert got["val/classify/auc"] == 0.5


def test_table_marks_tasks_that_do_not_beat_the_trivial_predictor():
    model = {"val/a/loss": 0.5, "val/a/r2": 0.4, "val/b/loss": 2.0, "val/b/r2": -0.3}
    trivial = {"val/a/loss": 1.0, "val/b/loss": 1.5}
    rows = {line.split()[0]: line.split() for line in metrics_table(model, "val", trivial).splitlines()[2:]}
    assert rows["a"][-1] == "yes" and rows["b"][-1] == "NO"
    assert math.isclose(float(rows["b"][-2]), 1.5)
