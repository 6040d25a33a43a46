"""`mtml tune` over the training itself (`search/`): the space as written in YAML, and a search
that chooses on validation and reports the test split from its repeats only."""

from __future__ import annotations

import math
import tempfile

import pandas as pd
import pytest
import yaml

from distributed_mtml.cli import main
from distributed_mtml.config import validate_config
from distributed_mtml.search.space import parse, trial_config, tune_space

SPACE = {"training.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "training.weight_decay": {"uniform": [0.0, 0.1]},
         "aggregation.method": {"choice": ["mean", "pcgrad", "mgda"]}, "model.architecture": {"grid": ["hard", "mmoe"]},
         "training.batch_size": {"randint": [16, 65]}}


def test_yaml_domains_become_tune_domains_and_a_trial_config_is_the_base_with_its_values():
    import ray.tune.search.sample as sample

    config = validate_config({"model": {"trunk": {"widths": [16]}}, "search": {"space": SPACE}})
    space = tune_space(parse(config, "s.yaml"))
    lr, decay, method, batch = (space[k] for k in ("training.lr", "training.weight_decay", "aggregation.method",
                                                     "training.batch_size"))
    assert isinstance(lr, sample.Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.get_sampler(), sample.LogUniform)
    assert isinstance(decay, sample.Float) and not isinstance(decay.get_sampler(), sample.LogUniform)
    assert isinstance(method, sample.Categorical) and method.categories == ["mean", "pcgrad", "mgda"]
    assert isinstance(batch, sample.Integer) and (batch.lower, batch.upper) == (16, 65)
    assert space["model.architecture"] == {"grid_search": ["hard", "mmoe"]}
    base = {"model": {"trunk": {"widths": [16]}}}
    trial = trial_config(base, {"training.lr": 0.005, "model.architecture": "mmoe", "aggregation.method": "pcgrad"})
    assert (trial.training.lr, trial.model.architecture, trial.aggregation.method) == (0.005, "mmoe", "pcgrad")
    assert trial.model.trunk.widths == [16] and trial.model.experts == 4


@pytest.mark.parametrize("space, message", [
    ({"training.lr": {"lognormal": [1, 2]}}, "search.space.training.lr: unknown domain 'lognormal' (kinds: choice, grid"),
    ({"training.lr": [0.1, 0.01]}, "search.space.training.lr: expected one domain such as {choice: [a, b]}"),
    ({"training.learning_rate": {"choice": [0.1]}}, "search.space.training.learning_rate: no such config key"),
    ({"training": {"choice": [1]}}, "search.space.training: a section, not a key"),
    ({"training.lr": {"loguniform": [0, 0.1]}}, "search.space.training.lr: loguniform needs low > 0"),
    ({"training.lr": {"uniform": [0.1]}}, "search.space.training.lr: uniform needs [low, high], two numbers"),
    ({"aggregation.method": {"choice": []}}, "search.space.aggregation.method: choice needs a non-empty list"),
    ({"aggregation.method": {"choice": ["mean", "pcgard"]}},
     "search.space.aggregation.method: the value 'pcgard' makes the config invalid"),
    ({"model.architecture": {"choice": ["mmoe", "cross_stitch"]}, "model.experts": {"choice": [2, 4]}},
     "search.space: the setting model.architecture=cross_stitch model.experts=2 makes the config invalid"),
    ({"tune.repeats": {"choice": [2, 3]}}, "search.space.tune.repeats: the search's own settings"),
])
def test_a_bad_search_space_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys, space, message):
    path = tmp_path / "s.yaml"
    model = {"architecture": "mmoe"} if "model.experts" in space else {}
    path.write_text(yaml.safe_dump({"suite": {"generator": "mmoe", "path": str(tmp_path / "suite")}, "model": model,
                                    "search": {"space": space}}))
    assert main(["tune", "--config", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: {message}"), err


@pytest.mark.ray
def test_a_search_chooses_by_validation_and_only_its_repeats_score_the_test_split(ray_session, tmp_path, capsys):
    """Two settings (a grid), each one local-mode run; the better by its kept validation loss is
    repeated under two new seeds. Search runs hold no test or baseline metric and no model; the
    repeats hold both; the parent holds the table and the best repeat's model."""
    from distributed_mtml.tracking import Tracker

    path, uri = tmp_path / "search.yaml", f"sqlite:///{tmp_path}/mlflow.db"
    path.write_text(yaml.safe_dump({
        "suite": {"generator": "mmoe", "path": str(tmp_path / "suite"), "options": {"rows": 120, "tasks": 2}},
        "model": {"trunk": {"widths": [16]}}, "training": {"epochs": 3, "batch_size": 32},
        "scaling": {"num_workers": 0}, "checkpoint": {"dir": str(tmp_path / "runs")},
        "search": {"space": {"training.lr": {"grid": [1.0e-4, 3.0e-3]}}},
        "tune": {"num_samples": 1, "repeats": 2, "cpus_per_trial": 0.5,
                 "grace_period": 4}}))  # no rung before the end: with two trials at once, ASHA's stop would
    assert main(["tune", "--config", str(path), "--tracking-uri", uri]) == 0  # hang on which reaches it first
    out = capsys.readouterr().out
    c = Tracker(uri).client()
    runs = c.search_runs([c.get_experiment_by_name("distributed-mtml").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mtml.search") == "training")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    search = [r for r in children if r.data.tags["mtml.stage"] == "search"]
    repeats = [r for r in children if r.data.tags["mtml.stage"] == "repeat"]
    assert len(search) == 2 and len(repeats) == 2
    assert all(r.info.status == "FINISHED" for r in children)
    for r in search:
        assert not [k for k in r.data.metrics if k.startswith(("test/", "baseline/"))], r.info.run_name
        assert "best/val/mean_loss" in r.data.metrics
        assert not c.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
    best = min(search, key=lambda r: r.data.metrics["best/val/mean_loss"])
    assert {r.data.params["training.lr"] for r in repeats} == {best.data.params["training.lr"]}
    assert parent.data.tags["mtml.best_setting"] == f"training.lr={float(best.data.params['training.lr']):.3g}"
    seeds = {r.data.params["training.seed"] for r in repeats}
    assert len(seeds) == 2 and best.data.params["training.seed"] not in seeds
    assert all(any(k.startswith("test/") for k in r.data.metrics) for r in repeats)
    with tempfile.TemporaryDirectory() as d:
        table = pd.read_csv(c.download_artifacts(parent.info.run_id, "search/results.csv", d))
    assert list(table["stage"]) == ["search", "search", "repeat"]
    vals = sorted(r.data.metrics["best/val/mean_loss"] for r in search)
    assert list(table["val mean"][:2]) == pytest.approx(vals)
    assert table["test mean"][2] == pytest.approx(sum(r.data.metrics["test/task0/loss"] + r.data.metrics["test/task1/loss"]
                                                      for r in repeats) / 4)
    assert not math.isnan(table["test ci95"][2])
    pick = parent.data.tags["mtml.best_run"]
    assert pick in {r.info.run_id for r in repeats}
    assert c.search_logged_models([parent.info.experiment_id], filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert "best by validation: training.lr=" in out


def test_the_driver_ends_each_trial_s_run_as_the_trial_ended(tmp_path, capsys):
    """A trial that fails: its run FAILED; one ASHA stopped (no last result of its own): FINISHED
    and tagged; one that ended by itself: its run as it left it. Progress counts the stage's trials."""
    from types import SimpleNamespace

    from distributed_mtml.search.run import _child_runs
    from distributed_mtml.search.trial import RUN_ID
    from distributed_mtml.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [tracker.create_run("e", name, {}, {}) for name in ("failed", "stopped", "done")]
    tracker.set_status(runs[2], "FINISHED")
    trials = [SimpleNamespace(last_result={RUN_ID: runs[0], "monitor": 1.0}, status="RUNNING"),
              SimpleNamespace(last_result={RUN_ID: runs[1], "monitor": 1.0, "epochs_done": 2}, status="RUNNING"),
              SimpleNamespace(last_result={RUN_ID: runs[2], "monitor": 0.5, "kept": 0.5}, status="RUNNING")]
    callback = _child_runs(tracker, "search", 4)
    callback.on_trial_error(0, trials, trials[0])
    callback.on_trial_complete(0, trials, trials[1])
    callback.on_trial_complete(0, trials, trials[2])
    got = [tracker.client().get_run(r) for r in runs]
    assert [r.info.status for r in got] == ["FAILED", "FINISHED", "FINISHED"]
    assert [r.data.tags.get("mtml.stopped_by") for r in got] == [None, "ASHA", None]
    assert "[tune] search trials 1/4 | 2 running | 0 pending" in capsys.readouterr().out
