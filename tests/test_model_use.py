"""Integration: the trained model in use. One `mtml train` run (two tasks of different feature
columns, raw units, string class labels) and one `mtml meta-train` run on the tests' local Ray;
their MLflow models loaded in fresh processes, registered, served, and mapped over Parquet."""

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import free_port

from distributed_mtml.artifacts import load_model
from distributed_mtml.config import validate_config
from distributed_mtml.data.generators import make_suite
from distributed_mtml.tracking import Tracker

pytestmark = pytest.mark.ray

ROWS = 400


def _suite(path: str) -> str:
    """cls reads a, b, c (labels 'no'/'yes'); reg reads a, b, d (a price in the thousands)."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)) * [1000, 1, 0.01, 10] + [5000, 0, 3, 50]
    a, b, c, d = x.T
    ids = np.arange(ROWS)
    pq.write_table(pa.table({"id": ids, "a": a, "b": b, "c": c, "label": np.where(b > 0, "yes", "no")}), f"{path}/cls.parquet")
    pq.write_table(pa.table({"id": ids, "a": a, "b": b, "d": d, "price": a * 3 + b * 500 + d}), f"{path}/reg.parquet")
    with open(f"{path}/suite.yaml", "w") as f:
        f.write("name: shops\ntasks:\n"
                "- {name: cls, type: classification, path: cls.parquet, target: label, features: [a, b, c]}\n"
                "- {name: reg, type: regression, path: reg.parquet, target: price, features: [a, b, d]}\n")
    return path


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    from distributed_mtml.train.launch import run_training

    root = tmp_path_factory.mktemp("model_use")
    suite = _suite(str(root / "suite"))
    config = validate_config({
        "suite": {"path": suite}, "training": {"epochs": 8, "batch_size": 32, "lr": 0.01, "seed": 0},
        "scaling": {"num_workers": 0}, "checkpoint": {"dir": str(root / "runs")}})  # local mode: the model is the point
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    outcome = run_training(config, "shops", tracker, register="shops")
    return root, suite, tracker, outcome


def _fresh_process(code: str, tracker: Tracker) -> str:
    """`code` in a new Python that imports neither the CLI nor the tests; its stdout."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _test_rows(suite: str) -> pd.DataFrame:
    """Every row of both files, with both tasks' columns (the union: a, b, c, d)."""
    cls, reg = (pq.read_table(f"{suite}/{n}.parquet").to_pandas() for n in ("cls", "reg"))
    return cls[["id", "a", "b", "c"]].assign(d=reg["d"])


def _by_hand(checkpoint: str, suite: str, rows: pd.DataFrame) -> pd.DataFrame:
    """The in-run model (the kept checkpoint) applied as evaluation applies it."""
    model, _ = load_model(checkpoint)
    out = {}
    with torch.no_grad():
        for task, columns in [("cls", ["a", "b", "c"]), ("reg", ["a", "b", "d"])]:
            prep = model.preprocessing[task]
            logits = model(task, torch.from_numpy(prep.inputs(rows[columns].to_numpy(np.float32))))
            if task == "cls":
                out["cls"] = np.asarray(prep.classes)[logits.argmax(-1).numpy()]
                out["cls_proba_yes"] = logits.softmax(-1)[:, 1].numpy()
            else:
                out["reg"] = prep.target_units(logits.squeeze(-1).double()).numpy()
    return pd.DataFrame(out)


@pytest.mark.e2e
def test_the_run_logs_a_pyfunc_model_that_a_fresh_process_loads_and_that_predicts_as_the_run(trained):
    root, suite, tracker, outcome = trained
    rows = _test_rows(suite)
    rows.to_parquet(root / "rows.parquet")
    got = _fresh_process(
        "import sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('runs:/{outcome.run_id}/model')\n"
        f"p = m.predict(pd.read_parquet({str(root / 'rows.parquet')!r}).drop(columns=['id']))\n"
        "assert 'distributed_mtml.cli' not in sys.modules\n"
        "print(p.to_json(orient='split'))\n"
        "print(m.metadata.signature.to_dict()['inputs'])", tracker)
    predicted = pd.read_json(io.StringIO(got.splitlines()[0]), orient="split")
    want = _by_hand(outcome.checkpoint_path, suite, rows)
    assert list(predicted.columns) == ["cls", "cls_proba_no", "cls_proba_yes", "reg"]
    assert (predicted["cls"] == want["cls"]).all() and set(want["cls"]) == {"no", "yes"}
    np.testing.assert_allclose(predicted["cls_proba_yes"], want["cls_proba_yes"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predicted["reg"], want["reg"], rtol=1e-6)
    assert predicted["reg"].abs().mean() > 1000  # the price's units, not standardised ones
    inputs = json.loads(got.splitlines()[1].replace("'", '"').replace("True", "true").replace("False", "false"))
    assert {(i["name"], i["required"]) for i in inputs} == {("a", True), ("b", True), ("c", False), ("d", False)}
    client = tracker.client()
    run = client.get_run(outcome.run_id)
    models = client.search_logged_models([run.info.experiment_id])
    (model,) = [m for m in models if m.source_run_id == outcome.run_id]
    assert model.name == "model" and model.metrics and {m.key for m in model.metrics} >= {"test/reg/mse", "best/val/mean_loss"}


def test_registered_versions_load_by_models_uri_and_commands_take_them(trained, capsys):
    from distributed_mtml.cli import main

    root, suite, tracker, outcome = trained
    client = tracker.client()
    assert client.get_model_version("shops", "1").run_id == outcome.run_id  # train --register
    capsys.readouterr()
    assert main(["register", "--run", outcome.run_id, "--name", "shops", "--tracking-uri", tracker.uri]) == 0
    assert "models:/shops/2" in capsys.readouterr().out
    client.set_registered_model_alias("shops", "champion", "2")
    got = _fresh_process(
        "import mlflow, pandas as pd\n"
        "rows = pd.DataFrame({'a': [5000.0, 4000.0], 'b': [1.0, -1.0], 'c': [3.0, 3.0], 'd': [50.0, 40.0]})\n"
        "print(mlflow.pyfunc.load_model('models:/shops/1').predict(rows).to_json(orient='split'))\n"
        "print(mlflow.pyfunc.load_model('models:/shops@champion').predict(rows).to_json(orient='split'))", tracker)
    first, champion = got.splitlines()
    assert first == champion
    assert main(["evaluate", "--run", "models:/shops@champion", "--suite", suite, "--tracking-uri", tracker.uri]) == 0
    assert "test split of" in capsys.readouterr().out


def test_datasets_and_the_experiment_kind_are_on_the_run(trained):
    root, suite, tracker, outcome = trained
    client = tracker.client()
    run = client.get_run(outcome.run_id)
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"cls", "reg"}
    reg = datasets["reg"].dataset
    assert json.loads(reg.source)["uri"] == f"{suite}/reg.parquet" and len(reg.digest) == 16
    assert [c["name"] for c in json.loads(reg.schema)["mlflow_colspec"]] == ["id", "a", "b", "d", "price"]
    assert {t.key: t.value for t in datasets["cls"].tags}["mlflow.data.context"] == "training"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.e2e
def test_predict_maps_a_large_table_with_ray_data_and_keeps_columns(trained, capsys):
    from distributed_mtml.cli import main
    from distributed_mtml.predict import BATCH_ROWS

    root, suite, tracker, outcome = trained
    rows = _test_rows(suite)
    big = pd.concat([rows] * (3 * BATCH_ROWS // ROWS + 1), ignore_index=True).assign(id=lambda t: np.arange(len(t)))
    pq.write_table(pa.Table.from_pandas(big), root / "big.parquet", row_group_size=1000)
    out = root / "predicted"
    capsys.readouterr()
    assert main(["predict", "--model", f"runs:/{outcome.run_id}/model", "--input", str(root / "big.parquet"),
                 "--out", str(out), "--keep", "id", "--tasks", "reg,cls", "--tracking-uri", tracker.uri]) == 0
    assert f"wrote {len(big):,} rows of predictions" in capsys.readouterr().out
    got = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
    assert list(got["id"]) == list(range(len(big)))
    want = _by_hand(outcome.checkpoint_path, suite, big)
    np.testing.assert_allclose(got["reg"], want["reg"], rtol=1e-6)
    assert (got["cls"] == want["cls"]).all()
    # a table of one task's columns predicts that task alone
    pq.write_table(pa.Table.from_pandas(rows[["a", "b", "d"]]), root / "reg_only.parquet")
    assert main(["predict", "--model", outcome.run_id, "--input", str(root / "reg_only.parquet"), "--tasks", "reg",
                 "--out", str(root / "reg_only"), "--tracking-uri", tracker.uri]) == 0
    assert list(pd.read_parquet(root / "reg_only").columns) == ["reg"]


@pytest.mark.e2e
def test_mlflow_models_serve_answers_with_the_same_predictions(trained):
    root, suite, tracker, outcome = trained
    rows = _test_rows(suite).head(5).drop(columns=["id"])
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{outcome.run_id}/model",
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = json.load(urllib.request.urlopen(request, timeout=10))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:] if server.poll() is not None else "no answer"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = pd.DataFrame(reply["predictions"])
    want = _by_hand(outcome.checkpoint_path, suite, rows)
    np.testing.assert_allclose(served["reg"], want["reg"], rtol=1e-6)
    assert list(served["cls"]) == list(want["cls"])


@pytest.mark.parametrize("case", ["missing_feature", "text_feature", "missing_keep", "out_not_empty", "adapt_no_target",
                                  "unknown_task"])
def test_predict_bad_input_exits_2_naming_the_column_before_ray_is_used(trained, case, capsys, monkeypatch):
    import distributed_mtml.runtime.cluster as cluster
    from distributed_mtml.cli import main

    root, suite, tracker, outcome = trained
    rows = _test_rows(suite).head(10)
    table, extra, expect = rows, [], None
    if case == "missing_feature":
        table, expect = rows.drop(columns=["d"]), "no column 'd', a feature of task 'reg'"
    elif case == "text_feature":
        table, expect = rows.assign(b=rows["b"].astype(str)), "column 'b' is (large_)?string, a feature must be numeric"
    elif case == "missing_keep":
        extra, expect = ["--keep", "customer"], "--keep: --input .* has no column 'customer'"
    elif case == "out_not_empty":
        os.makedirs(root / "full", exist_ok=True)
        (root / "full" / "x").write_text("")
        expect = "--out .*full: exists and is not empty"
    elif case == "adapt_no_target":  # a new group of the shared regression head: its labels must be there
        extra, expect = ["--adapt-from", str(root / f"{case}.parquet"), "--target", "price"], "--adapt-from .*: no column 'price'"
    else:
        extra, expect = ["--tasks", "cls,weather"], r"no task \['weather'\]"
    table.to_parquet(root / f"{case}.parquet")
    out = root / ("full" if case == "out_not_empty" else f"out-{case}")
    monkeypatch.setattr(cluster, "ensure_ray", lambda address: pytest.fail("Ray was used before the input was checked"))
    capsys.readouterr()
    assert main(["predict", "--model", outcome.run_id, "--input", str(root / f"{case}.parquet"), "--out", str(out),
                 "--tracking-uri", tracker.uri, *extra]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and re.search(expect, errors[0]), errors


def test_adapting_a_meta_learned_model_to_a_new_task_lowers_its_loss(ray_session, tmp_path, capsys):
    from distributed_mtml.cli import main
    from distributed_mtml.meta.launch import run_meta_training
    from distributed_mtml.predict import Predictor

    config = validate_config({
        "suite": {"generator": "sinusoid"}, "model": {"trunk": {"widths": [40, 40]}},
        "meta": {"algorithm": "metasgd", "iterations": 600, "report_every": 200, "meta_batch_size": 8},
        "scaling": {"num_workers": 0}, "checkpoint": {"dir": str(tmp_path / "runs")}})  # local mode
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    outcome = run_meta_training(config, "sines", tracker)
    rng = np.random.default_rng(7)  # a new sine: amplitude 3, phase 1
    x = rng.uniform(-5, 5, 110)
    new = pd.DataFrame({"x0": x, "y": 3 * np.sin(x - 1), "id": np.arange(110)})
    new.head(10).to_parquet(tmp_path / "labelled.parquet")
    new.tail(100).to_parquet(tmp_path / "rows.parquet")
    capsys.readouterr()
    assert main(["predict", "--model", f"runs:/{outcome.run_id}/model", "--input", str(tmp_path / "rows.parquet"),
                 "--out", str(tmp_path / "adapted"), "--keep", "id", "--adapt-from", str(tmp_path / "labelled.parquet"),
                 "--target", "y", "--steps", "5", "--tracking-uri", tracker.uri]) == 0
    assert "adapted on the rows of" in capsys.readouterr().out
    adapted = pd.read_parquet(tmp_path / "adapted").sort_values("id")
    plain = Predictor(outcome.checkpoint_path).predict(new.tail(100))
    truth = new.tail(100)["y"].to_numpy()
    adapted_mse = float(((adapted["meta"].to_numpy() - truth) ** 2).mean())
    plain_mse = float(((plain["meta"].to_numpy() - truth) ** 2).mean())
    assert adapted_mse < 0.5 * plain_mse, (adapted_mse, plain_mse)


def test_a_multitask_model_with_a_shared_head_adapts_to_a_new_group_from_its_labelled_rows(ray_session, tmp_path, capsys):
    """36 groups of a mixed model; 30 train (default heads: shared_plus_offset), 6 are new: each
    new group's offsets solved from 8 labelled rows beat the shared head alone (0 steps) on its
    other rows, pooled over the 6 groups. Only the model's saved statistics touch the new rows.
    `mtml predict --adapt-from` gives the same predictions, as column new_group."""
    from distributed_mtml.cli import main
    from distributed_mtml.data.suite import SuiteSpec, suite_yaml_path, write_text
    from distributed_mtml.predict import Predictor
    from distributed_mtml.train.launch import run_training

    suite = str(tmp_path / "suite")
    spec = make_suite("multilevel", suite, {"groups": 36, "rows": 40, "between": 0.6, "seed": 5})
    write_text(suite_yaml_path(suite), yaml.safe_dump(SuiteSpec(name="ml", tasks=spec.tasks[:30]).model_dump(
        exclude_none=True), sort_keys=False))  # groups 30..35 are not in the suite
    config = validate_config({"suite": {"path": suite}, "scaling": {"num_workers": 0},
                              "training": {"epochs": 40, "batch_size": 32, "lr": 0.003},
                              "checkpoint": {"dir": str(tmp_path / "runs")}})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    outcome = run_training(config, "groups", tracker)
    errors: dict[int, list] = {0: [], 1: []}
    for task in spec.tasks[30:]:
        rows = pq.read_table(f"{suite}/{task.path}").to_pandas().drop(columns="split")
        for steps, found in errors.items():
            predictor = Predictor(outcome.checkpoint_path)
            predictor.adapt(rows.head(8), "y", steps)
            found.append(predictor.predict(rows.tail(32), ["new_group"])["new_group"].to_numpy() - rows.tail(32)["y"])
    mse = {steps: float(np.mean(np.concatenate(found) ** 2)) for steps, found in errors.items()}
    assert mse[1] < 0.8 * mse[0], mse
    last = rows.assign(id=range(40))
    last.head(8).to_parquet(tmp_path / "labelled.parquet")
    last.tail(32).drop(columns="y").to_parquet(tmp_path / "rows.parquet")
    capsys.readouterr()
    assert main(["predict", "--model", outcome.run_id, "--input", str(tmp_path / "rows.parquet"), "--out",
                 str(tmp_path / "out"), "--keep", "id", "--adapt-from", str(tmp_path / "labelled.parquet"),
                 "--target", "y", "--tracking-uri", tracker.uri]) == 0
    assert "column new_group" in capsys.readouterr().out
    adapted = pd.read_parquet(tmp_path / "out").sort_values("id")
    assert list(adapted.columns) == ["new_group", "id"]
    np.testing.assert_allclose(adapted["new_group"] - last.tail(32)["y"].to_numpy(), errors[1][-1], rtol=1e-4, atol=1e-3)


def test_logging_and_loading_a_model_leave_mlflows_environment_as_it_was(trained):
    """MLflow exports its current tracking URI and experiment as environment variables; a later
    command in this process (or a subprocess) must not inherit a tracker it was not given."""
    from distributed_mtml.artifacts import model_dir

    root, suite, tracker, outcome = trained
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    with model_dir(f"runs:/{outcome.run_id}/model", None, tracker) as directory:
        assert os.path.exists(os.path.join(directory, "state.pt"))
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
