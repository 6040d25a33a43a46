"""The bad-input matrix: every case is a real broken file, config, flag or checkpoint; each must
end with exit code 2 and exactly one line on stderr that names what is wrong, before any Ray
worker starts (starting Ray or building a trainer fails these tests)."""

import json
import os
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distributed_mtml import store
from distributed_mtml.cli import main
from distributed_mtml.data.generators import make_suite
from distributed_mtml.tracking import Tracker


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray, a Ray Train trainer or a Tune search counts as a failure of the case."""
    import ray
    import ray.train.torch
    import ray.tune

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker was started for bad input")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mtml` process
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray.train.torch.TorchTrainer, "__init__", refuse)
    monkeypatch.setattr(ray.tune.Tuner, "__init__", refuse)


class Case:
    """A scratch directory with a good suite and a good config, to break one thing in."""

    def __init__(self, root):
        self.root = root
        self.suite = str(root / "suite")
        make_suite("seed-example", self.suite, {"rows": 120, "seed": 1})
        self.config = {"suite": {"path": self.suite}, "training": {"epochs": 1}, "scaling": {"num_workers": 2},
                       "checkpoint": {"dir": str(root / "runs")}}
        self.uri = f"sqlite:///{root}/mlflow.db"

    def path(self, name: str) -> str:
        return os.path.join(self.suite, name)

    def rewrite(self, task_file: str, column: str, values) -> None:
        table = pq.read_table(self.path(task_file))
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, pa.array(values(table.column(column).to_pylist())))
        pq.write_table(table, self.path(task_file))

    def edit_suite(self, change) -> None:
        with open(self.path("suite.yaml")) as f:
            spec = yaml.safe_load(f)
        change(spec)
        with open(self.path("suite.yaml"), "w") as f:
            yaml.safe_dump(spec, f)

    def write_config(self, raw=None) -> str:
        path = str(self.root / "config.yaml")
        with open(path, "w") as f:
            f.write(raw if isinstance(raw, str) else yaml.safe_dump(self.config))
        return path

    def train(self, *extra: str) -> list[str]:
        return ["train", "--config", self.write_config(), "--tracking-uri", self.uri, *extra]

    def checkpoint(self, name: str, widths: list[int]) -> str:
        """A real checkpoint directory of this suite's model, written as a worker writes it."""
        from distributed_mtml.aggregation import METHODS, loss_weighting
        from distributed_mtml.config import validate_config
        from distributed_mtml.models import build_shared_heads, build_task_modules, build_trunk
        from distributed_mtml.runtime.checkpoint import plan_text
        from distributed_mtml.runtime.worker import make_optimizer
        from distributed_mtml.train.checkpoint import save_worker_state
        from distributed_mtml.train.plan import make_plan

        plan = make_plan(validate_config({**self.config, "model": {"trunk": {"widths": widths}}}))
        shapes, cfg = plan.task_shapes(), plan.config.model
        trunk, shared = build_trunk(cfg, shapes), build_shared_heads(cfg, shapes, 0)
        modules = build_task_modules(cfg, shapes, 0, shared=shared)
        optimizer = make_optimizer("adam", [*trunk.parameters(), *shared.parameters(), *modules.parameters()], 1e-3, 0.0)
        directory = self.root / name
        directory.mkdir(parents=True)
        names = [s.name for s in shapes]
        save_worker_state(str(directory), 0, 0, plan_text(plan.model_dump(mode="json")), trunk, modules, optimizer,
                          loss_weighting(METHODS["mean"], names, names, {}), shared=shared)
        return str(directory)


class Exploit:
    """What a tampered checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _suite_cases():
    def corrupt_parquet(c):
        with open(c.path("classify.parquet"), "wb") as f:
            f.write(b"PAR1 this is not parquet")
        return c.train(), "classify.parquet: not a readable Parquet file (task 'classify')"

    def string_feature(c):  # listed features: by default a string column is just not a feature
        c.edit_suite(lambda s: s["tasks"][0].update(features=[f"x{i}" for i in range(10)]))
        c.rewrite("classify.parquet", "x3", lambda v: [str(x) for x in v])
        return c.train(), "classify.parquet: feature column 'x3' is not numeric (type string)"

    def label_out_of_range(c):
        c.rewrite("classify.parquet", "y", lambda v: [5] + v[1:])
        return c.train(), "classify.parquet: target column 'y' has label 5 outside 0..1"

    def nan_feature(c):
        c.rewrite("regress.parquet", "x0", lambda v: [float("nan")] + v[1:])
        return c.train(), "regress.parquet: feature column 'x0' has 1 missing (NaN or null) value(s) in task 'regress'"

    def string_target(c):
        c.rewrite("regress.parquet", "y", lambda v: ["high"] * len(v))
        return c.train(), "regress.parquet: target column 'y' is not numeric (type string)"

    def unknown_split(c):
        c.rewrite("regress.parquet", "split", lambda v: ["training"] + v[1:])
        return c.train(), "regress.parquet: split column 'split' has values ['training'] (allowed: train, val, test)"

    def missing_target(c):
        c.edit_suite(lambda s: s["tasks"][1].update(target="price"))
        return c.train(), "regress.parquet: target column 'price' not found"

    def missing_file(c):
        os.remove(c.path("regress.parquet"))
        return c.train(), "regress.parquet: file not found (task 'regress')"

    def duplicate_task(c):
        c.edit_suite(lambda s: s["tasks"][1].update(name="classify"))
        return c.train(), "suite.yaml: key 'tasks.1.name': duplicate task name 'classify'"

    def suite_unknown_key(c):
        c.edit_suite(lambda s: s["tasks"][0].update(weight=2))
        return c.train(), "suite.yaml: unknown key 'tasks.0.weight'"

    def suite_not_yaml(c):
        with open(c.path("suite.yaml"), "w") as f:
            f.write("tasks: [unclosed\n")
        return c.train(), "suite.yaml: cannot read"

    def no_classes(c):
        c.edit_suite(lambda s: s["tasks"][0].pop("num_classes"))
        return c.train(), "suite.yaml: key 'tasks.0.num_classes': required for classification task 'classify'"

    def missing_suite(c):
        shutil.rmtree(c.suite)
        return c.train(), "suite.yaml: file not found"

    def streamed_without_split(c):  # Ray Data filters the split at the read: it needs the column
        table = pq.read_table(c.path("regress.parquet"))
        pq.write_table(table.drop_columns(["split"]), c.path("regress.parquet"))
        c.edit_suite(lambda s: s["tasks"][1].pop("split_column"))  # a seeded split, fine in memory
        c.config["data"] = {"max_in_memory_mb": 0.001}
        return c.train(), "regress.parquet: task 'regress' is streamed (train split 0 MB as float32 > " \
                          "data.max_in_memory_mb 0.001) and needs a split column 'split'"

    def only_null_labels(c):  # a null target is an unlabelled row: a task needs some labelled ones
        c.rewrite("regress.parquet", "y", lambda v: pa.nulls(len(v), pa.float64()))
        return c.train(), "regress.parquet: task 'regress' has no labelled rows (target column 'y' is null in all"

    def target_shared_by_two_types(c):  # two targets of one file are fine; one column as two kinds of label is not
        c.edit_suite(lambda s: s["tasks"][1].update(path="classify.parquet"))
        return c.train(), ("classify.parquet: target column 'y' is read by tasks of different types "
                           "('classify' classification, 'regress' regression)")

    def pooled_column_text_in_one_task(c):  # data.standardize: suite pools x3 over both tasks
        c.rewrite("classify.parquet", "x3", lambda v: [str(x) for x in v])
        return c.train(), "classify.parquet: column 'x3' is string in task 'classify' and a numeric feature of task 'regress'"

    return [corrupt_parquet, string_feature, label_out_of_range, nan_feature, string_target, unknown_split,
            missing_target, missing_file, duplicate_task, suite_unknown_key, suite_not_yaml, no_classes, missing_suite,
            streamed_without_split, only_null_labels, target_shared_by_two_types, pooled_column_text_in_one_task]


def _config_cases():
    def unknown_key(c):
        c.config["training"]["epoch"] = 3
        return c.train(), "config.yaml: unknown key 'training.epoch'"

    def wrong_type(c):
        c.config["training"]["epochs"] = "ten"
        return c.train(), "config.yaml: key 'training.epochs': Input should be a valid integer"

    def negative_batch(c):
        c.config["training"]["batch_size"] = -4
        return c.train(), "config.yaml: key 'training.batch_size': Input should be greater than or equal to 1"

    def negative_workers(c):
        return c.train("--set", "scaling.num_workers=-1"), "key 'scaling.num_workers': Value error, must be at least 0"

    def elastic_range_backwards(c):
        return c.train("--set", "scaling.num_workers=[3,1]"), \
            "key 'scaling.num_workers': Value error, an elastic range is [min, max] with 1 <= min <= max, got [3, 1]"

    def zero_lr(c):
        return c.train("--set", "training.lr=0"), "key 'training.lr': Input should be greater than 0"

    def unknown_method(c):
        return c.train("--set", "aggregation.method=pcgradd"), "key 'aggregation': Value error, unknown method 'pcgradd'"

    def unknown_heads(c):
        return c.train("--set", "model.heads=pooled"), "key 'model.heads': Value error, unknown heads 'pooled'"

    def option_of_other_heads(c):
        c.config["model"] = {"heads": "separate", "head_penalty": 5}
        return c.train(), "config.yaml: key 'model.head_penalty': Value error, not an option of heads 'separate'"

    def unknown_architecture(c):  # the valid ones are listed
        return c.train("--set", "model.architecture=moe"), \
            "key 'model.architecture': Value error, unknown architecture 'moe' (choose from: hard, mmoe, cgc, ple, cross_stitch)"

    def option_of_other_architecture(c):
        c.config["model"] = {"architecture": "mmoe", "task_experts": 2}
        return c.train(), "config.yaml: key 'model.task_experts': Value error, not an option of architecture 'mmoe'"

    def no_experts(c):
        return c.train("--set", "model.architecture=mmoe", "--set", "model.experts=0"), \
            "key 'model.experts': Input should be greater than or equal to 1"

    def meta_of_gated_architecture(c):
        c.config["model"] = {"architecture": "mmoe"}
        return ["meta-train", "--config", c.write_config(), "--tracking-uri", c.uri], \
            "key 'model.architecture': meta-learning trains hard, not 'mmoe'"

    def unknown_standardize(c):
        return c.train("--set", "data.standardize=group"), "key 'data.standardize': Input should be 'suite', 'task' or 'off'"

    def set_without_value(c):
        return c.train("--set", "training.epochs"), "--set 'training.epochs': expected key=value"

    def set_unknown_key(c):
        return c.train("--set", "training.momentum=0.9"), "unknown key 'training.momentum'"

    def too_many_cpus(c):  # on a cluster address this is no error: the autoscaler may add nodes
        from ray._private.utils import get_num_cpus

        n = get_num_cpus() + 1
        return c.train("--set", f"scaling.cpus_per_worker={n}"), f"scaling.num_workers: 2 workers x {n} CPU need {2 * n} CPUs"

    def config_yaml_syntax(c):
        return ["train", "--config", c.write_config("training:\n  epochs: 3\n  lr: [0.1\n")], "config.yaml: line 4, column 1:"

    def set_bad_value_blames_the_flag(c):
        return c.train("--set", "training.epochs=ten"), "--set training.epochs=ten: key 'training.epochs'"

    def mistyped_suite_path(c):  # with a generator in the config: not generated into ./nowhere
        c.config["suite"] = {"generator": "seed-example", "options": {"rows": 120}}
        return c.train("--set", "suite.path=nowhere"), "--set suite.path=nowhere: no suite.yaml at"

    def gpus_not_there(c):  # this machine has no GPU (CI and development machines alike)
        import torch

        n = torch.cuda.device_count() + 1
        return (c.train("--set", "scaling.use_gpu=true", "--set", f"scaling.num_workers={n}"),
                f"scaling.use_gpu: {n} workers need {n} GPUs; this machine has {n - 1}")

    def unwritable_checkpoint_dir(c):
        (c.root / "a_file").write_text("where the checkpoint directory should go")
        c.config["checkpoint"]["dir"] = str(c.root / "a_file" / "runs")
        return c.train(), "checkpoint.dir: " + str(c.root / "a_file" / "runs") + " is not writable (Not a directory)"

    def config_not_found(c):
        return ["train", "--config", str(c.root / "nope.yaml")], "nope.yaml: config file not found"

    def config_not_a_mapping(c):
        return ["train", "--config", c.write_config("- just\n- a list\n")], "config.yaml: expected a mapping"

    def unknown_monitor(c):  # mse is a regression metric; classify is a classification task
        return c.train("--set", "checkpoint.monitor=val/classify/mse"), "checkpoint.monitor: 'val/classify/mse' is not"

    def unknown_algorithm(c):
        c.config["meta"] = {"algorithm": "protonet"}
        return ["meta-train", "--config", c.write_config(), "--tracking-uri", c.uri], "key 'meta.algorithm'"

    def option_of_another_method(c):  # GradDrop's leak set for PCGrad would silently do nothing
        return c.train("--set", "aggregation.method=pcgrad", "--set", "aggregation.leak=0.2"), \
            "key 'aggregation.leak': Value error, not an option of method 'pcgrad'"

    return [unknown_key, wrong_type, negative_batch, negative_workers, elastic_range_backwards, zero_lr, unknown_method, set_without_value,
            set_unknown_key, config_yaml_syntax, set_bad_value_blames_the_flag, mistyped_suite_path, too_many_cpus, gpus_not_there, unwritable_checkpoint_dir, config_not_found, config_not_a_mapping,
            unknown_monitor, unknown_algorithm, option_of_another_method, unknown_heads, option_of_other_heads, unknown_standardize,
            unknown_architecture, option_of_other_architecture, no_experts, meta_of_gated_architecture]


def _argument_and_checkpoint_cases():
    def unknown_run(c):
        Tracker(c.uri).create_run("distributed-mtml", "other", {}, {})  # the store exists, the run does not
        return ["evaluate", "--run", "0123456789abcdef", "--tracking-uri", c.uri], "--run: no run '0123456789abcdef'"

    def evaluate_suite_gone(c):  # without --suite, the model's own suite is scored
        directory = c.checkpoint("ck", [16])
        shutil.rmtree(c.suite)
        return ["evaluate", "--checkpoint", directory], "--suite: the run's suite"

    def evaluate_no_database(c):  # and no empty mlflow.db is left behind
        return ["evaluate", "--run", "0" * 32], "--tracking-uri: no MLflow database at"

    def missing_checkpoint(c):
        return ["evaluate", "--checkpoint", str(c.root / "gone"), "--suite", c.suite], "gone"

    def other_architecture(c):
        good, other = c.checkpoint("ck", [16]), c.checkpoint("other", [32, 8])
        shutil.copy(os.path.join(other, "trunk.pt"), os.path.join(good, "trunk.pt"))
        return (["evaluate", "--checkpoint", good, "--suite", c.suite],
                "trunk.pt: does not fit the model described in")

    def resume_other_architecture(c):
        run_id = Tracker(c.uri).create_run("distributed-mtml", "config", {}, {})
        Tracker(c.uri).set_status(run_id, "KILLED")
        saved = c.checkpoint("saved", [16])
        target = c.root / "runs" / f"config-{run_id[:12]}" / "checkpoint_epoch=0000"
        shutil.copytree(saved, target)
        snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": target.name}}  # as Ray Train records it
        (target.parent / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
        c.config["model"] = {"trunk": {"widths": [64]}}
        return c.train("--resume"), "model.trunk.widths [16], this config [64]"

    def tampered_checkpoint(c):
        directory = c.checkpoint("ck", [16])
        with open(os.path.join(directory, "state.pt"), "wb") as f:
            pickle.dump(Exploit(str(c.root / "pwned")), f)
        return (["evaluate", "--checkpoint", directory, "--suite", c.suite],
                "state.pt: refused: not a plain tensor checkpoint")

    def truncated_checkpoint(c):
        directory = c.checkpoint("ck", [16])
        with open(os.path.join(directory, "trunk.pt"), "r+b") as f:
            f.truncate(100)
        return ["evaluate", "--checkpoint", directory, "--suite", c.suite], "trunk.pt: cannot read"

    def affinity_unknown_run(c):
        Tracker(c.uri).create_run("distributed-mtml", "other", {}, {})  # the store exists, the run does not
        return ["affinity", "--run", "f" * 32, "--tracking-uri", c.uri], f"--run {'f' * 32}: no such run in"

    def affinity_without_relations(c):
        run_id = Tracker(c.uri).create_run("distributed-mtml", "plain", {}, {})
        return ["affinity", "--run", run_id, "--tracking-uri", c.uri], "no relations/affinity.csv in"

    def shots_zero(c):
        return ["meta-train", "--config", c.write_config(), "--set", "meta.shots=0"], "key 'meta.shots'"

    def half_migrated_store(c):  # as three runs started together in a fresh directory left it
        _half_migrated(c.uri)
        return c.train(), f"{c.root}/mlflow.db: the MLflow store was left half-migrated"

    return [unknown_run, evaluate_suite_gone, evaluate_no_database, missing_checkpoint, other_architecture, resume_other_architecture,
            tampered_checkpoint, truncated_checkpoint, affinity_unknown_run, affinity_without_relations, shots_zero,
            half_migrated_store]


def _half_migrated(uri: str) -> None:
    """The store at `uri` created, then set back one migration with a batch migration's table left."""
    import sqlite3

    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    Tracker(uri).client()
    store._READY.discard(uri)  # this process would not look again
    script = ScriptDirectory.from_config(_get_alembic_config(uri))
    previous = script.get_revision(script.get_current_head()).down_revision
    with sqlite3.connect(uri[len("sqlite:///"):]) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (previous,))
        db.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250))")


def _transfer_cases():
    def transfer(c, **change) -> list[str]:
        c.config["transfer"] = {"source": c.checkpoint("ck", [16]), "target": {"path": c.suite},
                                "target_task": "regress", "shots": 5, **change}
        return ["transfer", "--config", c.write_config(), "--tracking-uri", c.uri]

    def eval_split_removed(c):
        return transfer(c, eval_split="test"), "'eval_split' was removed: search and selection now use the target's val split"

    def empty_val_split(c):  # suite validation itself names it
        argv = transfer(c)  # the source checkpoint is made from the good suite
        c.rewrite("regress.parquet", "split", lambda v: ["train" if s == "val" else s for s in v])
        return argv, "regress.parquet: split column 'split': split 'val' is empty"

    return [eval_split_removed, empty_val_split]


CASES = _suite_cases() + _config_cases() + _argument_and_checkpoint_cases() + _transfer_cases()


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
def test_bad_input_exits_2_with_one_line_before_ray(make, tmp_path, monkeypatch, capsys, no_ray):
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    argv, expected = make(case)
    capsys.readouterr()  # what building the case printed (MLflow creating a database) is not the command's
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert not (tmp_path / "pwned").exists(), "unpickling ran the checkpoint's code"
    if make.__name__ == "evaluate_no_database":
        assert not (tmp_path / "mlflow.db").exists(), "evaluate made an empty mlflow.db"
    assert not (tmp_path / "nowhere").exists(), "a suite was generated into a mistyped path"
