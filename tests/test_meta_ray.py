"""Integration: distributed meta-training on a local Ray, read back through MlflowClient."""

import pytest
from conftest import logged_model_files

from distributed_mtml.config import validate_config
from distributed_mtml.meta.launch import run_meta_training
from distributed_mtml.tracking import Tracker

pytestmark = pytest.mark.ray


def _config(tmp_path, **sections):
    raw = {
        "suite": {"generator": "sinusoid"},
        "model": {"trunk": {"widths": [40, 40]}},
        "meta": {"iterations": 400, "meta_batch_size": 10, "shots": 5, "report_every": 100, "val_tasks": 100},
        "scaling": {"num_workers": 2},
        "checkpoint": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_config(raw)


def _tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db")


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_distributed_maml_lowers_the_post_adaptation_loss_and_evaluates(ray_session, tmp_path, capsys):
    from distributed_mtml.artifacts import load_model
    from distributed_mtml.cli import main

    out = run_meta_training(_config(tmp_path), "sine", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mtml.command"] == "meta-train" and run.data.tags["mtml.algorithm"] == "maml"
    val = _history(client, out.run_id, "val/meta/loss")
    assert len(val) == 4 and val[-1] < val[0]  # meta-training lowered the loss after adaptation
    assert run.data.metrics["val/meta/loss"] < run.data.metrics["val/meta/loss_before"]  # and adaptation helps
    with_model = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "plots"} <= with_model
    assert "MLmodel" in logged_model_files(_tracker(tmp_path).uri, out.run_id)
    model, _ = load_model(out.checkpoint_path)
    assert list(model.tasks) == ["meta"]

    capsys.readouterr()
    assert main(["evaluate", "--run", out.run_id, "--shots", "5", "--steps", "2", "--tasks", "50",
                 "--tracking-uri", _tracker(tmp_path).uri]) == 0
    printed = capsys.readouterr().out
    assert "50 held-out tasks, 5 shots" in printed
    steps = sorted(m.step for m in client.get_metric_history(out.run_id, "fewshot/5shot/loss"))
    assert steps == [0, 1, 2]
    assert "plots/fewshot_5shot_loss.png" in {a.path for a in client.list_artifacts(out.run_id, "plots")}


@pytest.mark.e2e
def test_meta_training_keeps_the_best_report_and_stops_early(ray_session, tmp_path):
    """Monitored in 'max' mode the first report is the best (meta-training lowers the loss), so
    with patience 1 the run stops at the second report and keeps the first one's model."""
    from distributed_mtml.runtime.checkpoint import load_state

    cfg = _config(tmp_path, training={"early_stopping_patience": 1}, checkpoint={"mode": "max"},
                  meta={"iterations": 1000})
    out = run_meta_training(cfg, "patient", _tracker(tmp_path))
    client = _tracker(tmp_path).client()
    run = client.get_run(out.run_id)
    history = sorted(client.get_metric_history(out.run_id, "val/meta/loss"), key=lambda m: m.step)
    best = max(history, key=lambda m: (m.value, -m.step))
    assert [m.step for m in history] == [100, 200] and best.step == 100
    assert run.data.tags["mtml.best_iteration"] == "100" and run.data.tags["mtml.stopped_early"] == "true"
    assert load_state(out.checkpoint_path)["iterations_done"] == 100


@pytest.mark.e2e
def test_meta_training_on_a_suite_shards_its_tasks_and_resumes(ray_session, tmp_path):
    from distributed_mtml.data.generators import make_suite

    suite = str(tmp_path / "mmoe")
    make_suite("mmoe", suite, {"tasks": 4, "features": 8, "rows": 200})
    cfg = _config(tmp_path, suite={"path": suite, "generator": None},
                  model={"trunk": {"widths": [16]}},
                  meta={"algorithm": "anil", "iterations": 20, "report_every": 10, "val_tasks": 8})
    tracker = _tracker(tmp_path)
    first = run_meta_training(cfg, "suite-meta", tracker)
    client = tracker.client()
    params = client.get_run(first.run_id).data.params  # task2 is held out (validation), owned like the others
    assert params["plan.held_tasks"] == "['task2']"
    assert params["plan.shards"] == str([["task0", "task3"], ["task1", "task2"]])
    client.set_terminated(first.run_id, status="KILLED")  # as if interrupted after 20 iterations
    longer = cfg.model_copy(update={"meta": cfg.meta.model_copy(update={"iterations": 30})})
    again = run_meta_training(longer, "suite-meta", tracker, resume=True)
    assert again.run_id == first.run_id
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "val/meta/loss"))
    assert steps == [10, 20, 30]
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("suite, meta, message", [
    ("seed-example", {}, "one type, feature count and class count"),
    ("family", {"meta_batch_size": 1}, "meta.meta_batch_size (1) must be at least scaling.num_workers (2)"),
    ("seed-example", {"shots": 400}, "no task has the 800 labelled train rows an episode needs (meta.shots + query)"),
])
def test_bad_meta_input_exits_2_before_ray(tmp_path, seed_suite, capsys, suite, meta, message):
    import yaml

    from distributed_mtml.cli import main

    source = {"generator": "sinusoid"} if suite == "family" else {"path": seed_suite}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"suite": source, "meta": meta, "scaling": {"num_workers": 2}}))
    assert main(["meta-train", "--config", str(config), "--tracking-uri", _tracker(tmp_path).uri]) == 2
    assert message in capsys.readouterr().err
