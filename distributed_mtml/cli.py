"""The `mtml` command line: parse, load config, call the API. No logic of its own.

Heavy imports (Ray, MLflow, torch) happen inside the command functions, so `mtml --help`
and `mtml data validate` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import typing

from distributed_mtml import compat

compat.system_arrow_pool()  # before any import below can make Arrow allocate: see compat

from distributed_mtml.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, InputError, TrainingFailed  # noqa: E402
from distributed_mtml.tracking import Tracker, default_tracking_uri  # noqa: E402

if typing.TYPE_CHECKING:
    from distributed_mtml.config import Config

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")  # package data;
# jobs/configs/demo.yaml links to it


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray; 'auto' on a cluster)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, 'distributed-mtml')")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (always in Ray's session logs)")


def _scalar_type(annotation) -> type:
    """`int | None` -> int: argparse needs a callable, pydantic validates the rest."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _add_data_commands(sub) -> None:
    from distributed_mtml.data.generators import GENERATORS

    parent = sub.add_parser("data", help="make, validate and show task suites")
    parent.set_defaults(func=cmd_data)
    data = parent.add_subparsers(dest="data_cmd", required=True)
    make = data.add_parser("make", help="generate a synthetic suite").add_subparsers(dest="generator", required=True)
    for name, gen in GENERATORS.items():
        p = make.add_parser(name, help=gen.summary)
        p.add_argument("--out", required=True, help="directory (or URI) to write the suite to")
        for field, info in gen.options.model_fields.items():
            kind = _scalar_type(info.annotation)
            how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}  # --x / --no-x
            p.add_argument(f"--{field}", **how, default=info.default, help=f"{info.description} (default {info.default})")
    validate = data.add_parser("validate", help="check a suite, one line per problem")
    validate.add_argument("suite")
    validate.add_argument("--address", help="check each task's file as a Ray task on this cluster, all at once "
                                            "('auto' inside a job; every node must reach the suite: a bucket URI "
                                            "or a shared path)")
    data.add_parser("show", help="tasks, types, rows per split, features").add_argument("suite")


def build_parser() -> argparse.ArgumentParser:
    from distributed_mtml import __version__

    parser = argparse.ArgumentParser(prog="mtml", description="Multi-task and meta-learning on Ray, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"mtml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the article's example on local Ray and show where to look")
    demo.set_defaults(func=cmd_demo)
    _add_common(demo)
    _add_data_commands(sub)
    train = sub.add_parser("train", help="multi-task training on Ray Train workers")
    train.add_argument("--config", required=True)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    train.add_argument("--resume", action="store_true", help="continue the newest unfinished run of this config")
    train.add_argument("--register", metavar="NAME", help="also make the model a version of this registered model")
    train.set_defaults(func=lambda args: cmd_train(args, args.config, args.set, args.resume, args.register))
    _add_common(train)
    meta = sub.add_parser("meta-train", help="meta-learning (MAML, FOMAML, Reptile, ANIL, Meta-SGD) on Ray Train workers")
    meta.add_argument("--config", required=True)
    meta.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    meta.add_argument("--resume", action="store_true", help="continue the newest unfinished run of this config")
    meta.add_argument("--register", metavar="NAME", help="also make the model a version of this registered model")
    meta.set_defaults(func=cmd_meta_train)
    _add_common(meta)
    ev = sub.add_parser("evaluate", help="test metrics of a trained model; few-shot adaptation of a meta-learned one")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id, or a model URI: runs:/<id>/model, models:/<name>/<version|@alias>")
    source.add_argument("--checkpoint", help="checkpoint directory")
    ev.add_argument("--suite", help="suite to score on (meta-learned models: held-out tasks; default: the run's family)")
    ev.add_argument("--shots", type=int, default=None, help="meta: support points per task (default: meta.shots)")
    ev.add_argument("--split", choices=["test", "val"], default="test",
                    help="multi-task models: the split to score (val: compare with the run's logged validation numbers)")
    ev.add_argument("--steps", type=int, default=10, help="meta: adaptation steps to score (0..N)")
    ev.add_argument("--tasks", type=int, default=600, help="meta: held-out tasks")
    ev.add_argument("--table", help="multi-task models: also write every task's metrics to this Parquet file (with more "
                                    "tasks than tracking.task_metrics_limit, default ./mtml_evaluate_<split>.parquet)")
    ev.set_defaults(func=cmd_evaluate)
    _add_common(ev)
    for name, text, func in [
            ("transfer", "carry a trained model to a target task with every configured strategy", cmd_transfer),
            ("tune", "Ray Tune search over the training (a config with search:) or over transfer strategies, then "
                     "repeats of the best with confidence intervals", cmd_tune)]:
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        p.add_argument("--config", required=True)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
        if name == "tune":
            p.add_argument("--resume", action="store_true", help="a training search: continue the newest unfinished one "
                                                                 "of this config")
            p.add_argument("--register", metavar="NAME", help="a training search: make the best repeat's model a "
                                                              "version of this registered model")
        _add_common(p)
    _add_model_commands(sub)
    aff = sub.add_parser("affinity", help="task-affinity matrix of a run and the best groupings")
    aff.add_argument("--run", required=True, help="MLflow run id of a `mtml train` run with relations.enabled")
    aff.add_argument("--max-groups", type=int, default=None, help="groupings for 2..G groups (default: up to 4)")
    aff.set_defaults(func=cmd_affinity)
    _add_common(aff)
    return parser


def _add_model_commands(sub) -> None:
    pred = sub.add_parser("predict", help="predictions for a Parquet table of any size (Ray Data), optionally after "
                                          "adapting a meta-learned model to a new task")
    pred.add_argument("--model", required=True, help="runs:/<id>/model, models:/<name>/<version|@alias>, a run id, "
                                                     "or a checkpoint directory")
    pred.add_argument("--input", required=True, help="Parquet file or directory (or any pyarrow filesystem URI)")
    pred.add_argument("--out", required=True, help="a new directory for the predictions (Parquet)")
    pred.add_argument("--tasks", help="comma-separated tasks to predict (default: every task)")
    pred.add_argument("--keep", help="comma-separated input columns to copy next to the predictions (e.g. an id)")
    pred.add_argument("--adapt-from", help="labelled rows of a new task (Parquet) to adapt on first: a meta-learned model "
                      "takes inner steps; a multi-task model with a shared head (model.heads: shared_plus_offset) solves "
                      "the new group's offsets and predicts it as column new_group")
    pred.add_argument("--target", help="with --adapt-from: the labelled rows' target column")
    pred.add_argument("--steps", type=int, default=None, help="with --adapt-from: a meta-learned model's inner steps "
                      "(default: the count that did best on its validation tasks, 10 for models saved before it was kept)")
    pred.add_argument("--actors", type=int, default=1, help="actors holding the model (default 1; Ray Data scales up to it)")
    pred.add_argument("--gpu", action="store_true", help="one GPU per actor")
    pred.set_defaults(func=cmd_predict)
    _add_common(pred)
    reg = sub.add_parser("register", help="a Model Registry version of a run's model")
    reg.add_argument("--run", required=True, help="MLflow run id of a finished train or meta-train run")
    reg.add_argument("--name", required=True, help="registered model name (created if new)")
    reg.set_defaults(func=cmd_register)
    _add_common(reg)


def cmd_data(args) -> int:
    from distributed_mtml.data.generators import GENERATORS, make_suite

    if args.data_cmd == "make":
        fields = GENERATORS[args.generator].options.model_fields
        spec = make_suite(args.generator, args.out, {f: getattr(args, f) for f in fields})
        print(f"wrote suite '{spec.name}' with {len(spec.tasks)} tasks to {args.out}")
        return EXIT_OK
    if args.data_cmd == "validate":
        from distributed_mtml.data.tasks import group_summaries
        from distributed_mtml.data.validate import scan_suite

        if args.address:
            from distributed_mtml.runtime.cluster import ensure_ray

            ensure_ray(args.address)
        spec, _, problems = scan_suite(args.suite, on_cluster=bool(args.address))
        if problems:
            raise InputError(problems)
        print(f"{args.suite}: ok ({len(spec.tasks)} tasks)")
        for summary in group_summaries(spec).values():
            print(summary.line())
        return EXIT_OK
    return show_suite(args.suite)


def show_suite(suite_dir: str) -> int:
    from distributed_mtml.data.suite import SPLITS
    from distributed_mtml.data.tasks import SUMMARY_ABOVE, group_summaries
    from distributed_mtml.data.validate import checked_scans
    from distributed_mtml.models import TaskShape
    from distributed_mtml.report import table

    spec, scans = checked_scans(suite_dir, impute=True)  # streamed: no table is held; missing features are listed
    summaries = group_summaries(spec)
    many = {e for e, summary in summaries.items() if len(summary.rows) > SUMMARY_ABOVE}  # a line each, not a table
    rows = []
    for task in spec.tasks:
        if task.entry in many:
            continue
        scan, shape = scans[task.name], TaskShape.of_scan(scans[task.name])
        kind = f"classification ({shape.num_classes})" if task.type == "classification" else "regression"
        split = "seeded" if scan.seeded else f"column '{task.split_column}'"
        labels = f" ({', '.join(scan.class_names())})" if scan.classes else ""
        counts = [n if scan.labelled[s] == n else f"{scan.labelled[s]} of {n}" for s, n in scan.rows.items()]
        rows.append([task.name, kind, *counts, len(scan.features), task.target + labels, split])
    fractions = "/".join(f"{f:g}" for f in spec.split_fractions)
    print(f"suite '{spec.name}': {spec.description}")
    if rows:
        print(table(["task", "type", *SPLITS, "features", "target", "split"], rows))
    for summary in summaries.values():
        print(summary.line())
    if any(s.labelled != s.rows for s in scans.values()):
        print("'L of N': N rows, L of them labelled; a row whose target is null is left out of that task")
    for task in spec.tasks:
        if scans[task.name].missing:
            gaps = ", ".join(f"{c} ({n})" for c, n in scans[task.name].missing.items())
            print(f"task '{task.name}': missing feature values in labelled rows: {gaps}; training needs data.impute: mean")
    print(f"a task without a split column is split at random (seeded): split_fractions {fractions} "
          f"(train/val/test), split_seed {spec.split_seed}")
    return EXIT_OK


def _load_run_config(args, config_path: str, overrides: list[str]):
    from distributed_mtml.config import load_config

    config = load_config(config_path, overrides)
    _check_given_suite_path(config, overrides, config_path)
    if args.experiment:
        config.tracking.experiment = args.experiment
    return config, config.tracking.run_name or os.path.splitext(os.path.basename(config_path))[0]


def _check_given_suite_path(config, overrides: list[str], config_path: str) -> None:
    """A suite path typed on the command line that holds no suite is a mistake, not a request to
    generate synthetic data there (the config's generator writes only where the file says)."""
    from distributed_mtml.data.suite import SUITE_FILE

    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "suite.path"]
    if not given or config.suite is None or config.suite.generator is None:
        return
    path = config.suite.resolved_path()
    if "://" not in path and not os.path.exists(os.path.join(path, SUITE_FILE)):
        raise InputError(f"--set suite.path={given[-1]}: no {SUITE_FILE} at {path}; to generate the "
                         f"'{config.suite.generator}' suite there, write path: {given[-1]} in {config_path}")


def _tracker(args: argparse.Namespace, config: Config | None = None) -> Tracker:
    """The command's one `Tracker`: --tracking-uri, then the config's `tracking.uri`, then
    $MLFLOW_TRACKING_URI, then ./mlflow.db; a server that does not answer is exit 2 here."""
    return Tracker.resolve(args.tracking_uri, config.tracking.uri if config is not None else None)


def _uri_flag(tracker: Tracker) -> str:
    return "" if tracker.uri == default_tracking_uri() else f" --tracking-uri {tracker}"


def cmd_meta_train(args) -> int:
    from distributed_mtml.meta.launch import run_meta_training

    config, run_name = _load_run_config(args, args.config, args.set)
    outcome = run_meta_training(config, run_name, _tracker(args, config), args.resume, args.address, args.register)
    m, stopped = outcome.kept, " (stopped early)" if outcome.stopped_early else ""
    print(f"\nrun {outcome.run_id} finished{stopped}; the kept model is iteration {outcome.best_step}'s: validation "
          f"query loss {m['val/meta/loss_before']:.4f} before and {m['val/meta/loss']:.4f} after "
          f"{config.meta.inner_steps} adaptation step(s)")
    _say_where(outcome.tracker, outcome.run_id)
    print(f"evaluate it: mtml evaluate --run {outcome.run_id} --shots {config.meta.shots} --steps 10"
          f"{_uri_flag(outcome.tracker)}")
    _say_model(outcome, args.register)
    return EXIT_OK


def _say_where(tracker: Tracker, run_id: str) -> None:
    """The `mlflow ui` command for a local store, and the run's own page."""
    if not tracker.uri.startswith(("http://", "https://")):
        print(f"\nlook at it:  mlflow ui --backend-store-uri {tracker}")
        print(f"its page:    {tracker.run_page(run_id)}")
    else:
        print(f"\nlook at it:  {tracker.run_page(run_id)}")


def _say_model(outcome, registered: str | None) -> None:
    where = f"models:/{registered}/latest" if registered else f"runs:/{outcome.run_id}/model"
    print(f"use it:      mtml predict --model {where} --input ROWS.parquet --out DIR{_uri_flag(outcome.tracker)}")


def cmd_train(args, config_path: str, overrides: list[str], resume: bool = False, register: str | None = None) -> int:
    from distributed_mtml import per_task
    from distributed_mtml.report import metrics_table, tasks_summary
    from distributed_mtml.train.launch import run_training

    config, run_name = _load_run_config(args, config_path, overrides)
    outcome = run_training(config, run_name, _tracker(args, config), resume, args.address, register)
    stopped = " (stopped early)" if outcome.stopped_early else ""
    print(f"\nrun {outcome.run_id} finished{stopped}; the kept model is epoch {outcome.best_step + 1}'s, "
          f"best {config.checkpoint.monitor}; its validation metrics:")
    if not per_task.printed_in_full(per_task.task_count(outcome.kept), config.tracking.task_metrics_limit):
        print(tasks_summary(outcome.kept, "val"))
    else:
        trivial = {k[len("baseline/"):]: v for k, v in outcome.metrics.items() if k.startswith("baseline/")}
        print(metrics_table(outcome.kept, "val", trivial or None))  # none: in the run's per_task/baseline table
    print(f"throughput: {outcome.metrics.get('throughput/samples_per_s', float('nan')):.0f} samples/s")
    _say_where(outcome.tracker, outcome.run_id)
    print(f"evaluate it: mtml evaluate --run {outcome.run_id} --suite {config.suite.resolved_path()}"
          f"{_uri_flag(outcome.tracker)}")
    _say_model(outcome, register)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from distributed_mtml import per_task
    from distributed_mtml.artifacts import load_model, model_dir
    from distributed_mtml.evaluate import evaluate
    from distributed_mtml.report import metrics_table, tasks_summary
    from distributed_mtml.runtime.checkpoint import load_state
    from distributed_mtml.train.plan import TrainPlan

    tracker = _tracker(args)
    if args.run:
        tracker.check_store_exists()  # an empty mlflow.db made here would hold no run
    with model_dir(args.run, args.checkpoint, tracker) as directory:
        if load_state(directory).get("kind") == "meta":
            return _evaluate_meta(args, directory, tracker)
        model, plan = load_model(directory)
    from distributed_mtml.baseline import baseline_metrics

    suite = args.suite or plan["suite_dir"]  # the suite the model was trained on
    if not os.path.isdir(suite) and "://" not in suite:
        raise InputError(f"--suite: the run's suite {suite} is not there any more; name one with --suite")
    scores = evaluate(model, suite, args.split)
    many = not per_task.printed_in_full(per_task.task_count(scores),
                                        TrainPlan.model_validate(plan).config.tracking.task_metrics_limit)
    if many:
        print(f"{args.split} split of {suite}:\n{tasks_summary(scores, args.split)}")
    else:
        print(f"{args.split} split of {suite} (trivial: the train mean, or the train class frequencies):")
        print(metrics_table(scores, args.split, baseline_metrics(suite, (args.split,), model.preprocessing)))
    table = args.table or (f"mtml_evaluate_{args.split}.parquet" if many else None)
    if table:
        per_task.write_table(per_task.summarize(scores)[1], table)
        print(f"every task's metrics: {os.path.abspath(table)}")
    return EXIT_OK


def _evaluate_meta(args, directory: str, tracker: Tracker) -> int:
    from distributed_mtml.meta.checkpoint import load_learner
    from distributed_mtml.meta.evaluate import few_shot_curve, held_out_episodes, log_curve
    from distributed_mtml.report import table

    learner, plan = load_learner(directory)
    meta = plan["config"]["meta"]
    shots = args.shots or meta["shots"]
    query = meta["query"] or meta["shots"]
    for name, value in [("--shots", shots), ("--steps", args.steps + 1), ("--tasks", args.tasks)]:
        if value < 1:
            raise InputError(f"{name}: must be positive")
    episodes = held_out_episodes(plan, args.suite, shots, query, args.tasks)
    curve = few_shot_curve(learner, episodes, args.steps)
    print(f"{meta['algorithm']}: {args.tasks} held-out tasks, {shots} shots, {query} query points each (95% CI)")
    steps = [m for m in curve if len(curve[m]) > 1]
    ci = lambda point: f"{point[0]:.4f} +- {point[1]:.4f}"  # noqa: E731
    rows = [[step, *(ci(curve[m][step]) for m in steps)] for step in range(args.steps + 1)]
    print(table(["steps", *(f"query {m}" for m in steps)], rows))
    if "support_mean" in curve:  # the anchors, on the same episodes
        best = min(range(args.steps + 1), key=lambda s: curve["loss"][s][0])
        print(f"anchors on the same episodes: no adaptation (step 0) {ci(curve['loss'][0])}; step 0 shifted by the "
              f"support rows' mean residual {ci(curve['support_mean'][0])}; the best step is {best}"
              + ("" if curve["loss"][best][0] < curve["support_mean"][0][0] else ", and it does not beat the shift"))
    if args.run:
        log_curve(tracker, args.run, curve, shots)
        print(f"logged fewshot/{shots}shot/* and plots/fewshot_{shots}shot_*.png to run {args.run}")
    return EXIT_OK


def cmd_transfer(args) -> int:
    from distributed_mtml.report import table
    from distributed_mtml.transfer.run import run_transfer

    config, run_name = _load_run_config(args, args.config, args.set)
    tracker = _tracker(args, config)
    parent, header, rows = run_transfer(config, tracker, run_name)
    print(table(header, rows))
    print(f"\nparent run {parent} in experiment '{config.tracking.transfer_experiment_name()}'; one child run per "
          f"strategy: mlflow ui --backend-store-uri {tracker}")
    return EXIT_OK


def cmd_tune(args) -> int:
    from distributed_mtml.report import table
    from distributed_mtml.transfer.search import run_tune

    config, run_name = _load_run_config(args, args.config, args.set)
    tracker = _tracker(args, config)
    if config.search is not None:
        return _tune_training(args, config, run_name, tracker)
    if args.resume or args.register:
        raise InputError(f"{args.config}: --resume and --register are for a training search (a config with search:)")
    parent, header, rows, best = run_tune(config, tracker, run_name, args.address)
    print(table(header, rows))
    print(f"\nbest by validation: {best} (tagged mtml.best_strategy on parent run {parent} in experiment "
          f"'{config.tracking.transfer_experiment_name()}'); mlflow ui --backend-store-uri {tracker}")
    return EXIT_OK


def _tune_training(args, config: Config, run_name: str, tracker: Tracker) -> int:
    from distributed_mtml.report import table
    from distributed_mtml.search import summary
    from distributed_mtml.search.run import run_search

    parent, rows, best = run_search(config, args.config, tracker, run_name, args.address, args.register, args.resume)
    print(table(summary.HEADER, [[_cell(v) for v in row] for row in rows]))
    print(f"\nbest by validation: {best}; its repeats' test numbers are the ones to report. Parent run {parent} in "
          f"experiment '{config.tracking.experiment}' (search/results.csv, the best repeat's model): "
          f"mlflow ui --backend-store-uri {tracker}")
    return EXIT_OK


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


def _check_relations_logged(c, run_id: str, tracker: Tracker) -> None:
    """A missing run or a run without relations is bad input; anything else MLflow answers
    (authentication, network, storage) is said as it is."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise InputError(f"--run {run_id}: no such run in {tracker}") from None
        raise
    if "relations/affinity.csv" not in {a.path for a in c.list_artifacts(run_id, "relations")}:
        raise InputError(f"--run {run_id}: no relations/affinity.csv in {tracker} (train with relations.enabled: true)")


def cmd_affinity(args) -> int:
    import tempfile

    from distributed_mtml import relations
    from distributed_mtml.report import table

    tracker = _tracker(args)
    c = tracker.client()
    _check_relations_logged(c, args.run, tracker)
    with tempfile.TemporaryDirectory() as d:
        path = c.download_artifacts(args.run, "relations/affinity.csv", d)
        values, order = relations.from_csv(open(path).read())
        logged = {a.path for a in c.list_artifacts(args.run, "relations")}
        kind = next((k for k in LEARNED if f"relations/{k}.csv" in logged), None)
        learned = relations.from_csv(open(c.download_artifacts(args.run, f"relations/{kind}.csv", d)).read()) if kind else None
    print("TAG affinity, source (row) -> recipient (column); positive: a step on the source helps the recipient")
    print(table(["source", *order], [[a, *map(float, row)] for a, row in zip(order, values)]))
    most = min(args.max_groups or 4, len(order))
    lines = []
    for g in range(2, most + 1):
        groups, score = relations.best_grouping(values, g)
        named = " | ".join("{" + ", ".join(order[i] for i in grp) + "}" for grp in groups)
        lines.append(f"{g} groups (score {score:.4g}): {named}")
    print("\nbest groupings (TAG rule" + (", exhaustive" if len(order) <= relations.EXHAUSTIVE_UP_TO else ", greedy") + "):")
    print("\n".join(lines))
    c.log_text(args.run, "\n".join(lines) + "\n", "relations/groupings.txt")
    if learned is not None:
        _print_learned(kind, values, order, *learned)
    return EXIT_OK


LEARNED = {  # what an architecture's run logs of how its tasks relate (`gates.py`): file stem -> what it is
    "gate_similarity": "learned by the gates: similarity of the tasks' mean gate weights (1: the same experts, equally)",
    "cross_stitch": "learned by cross-stitch: how much each task's column (column) takes from each other's (row)",
}


def _print_learned(kind: str, affinity, order: list[str], alike, names: list[str]) -> None:
    """The architecture's learned relation beside TAG's measured one, and their rank correlation."""
    from distributed_mtml import gates
    from distributed_mtml.report import table

    rho, pairs = gates.agreement(affinity, order, alike, names)
    print(f"\n{LEARNED[kind]}")
    print(table(["task", *names], [[a, *map(float, row)] for a, row in zip(names, alike)]))
    print(f"rank correlation with TAG affinity (both directions averaged), over {pairs} pairs of tasks: {rho:.3f}")


def cmd_predict(args) -> int:
    from distributed_mtml.artifacts import model_dir
    from distributed_mtml.predict import PredictJob, run_predict

    tracker = _tracker(args)
    local = args.model if os.path.isdir(args.model) else None
    if local is None:
        tracker.check_store_exists()
    split = lambda text: [c.strip() for c in text.split(",") if c.strip()] if text else []  # noqa: E731
    with model_dir(None if local else args.model, local, tracker, "--model") as directory:
        job = PredictJob(directory, args.input, args.out, split(args.tasks) or None, split(args.keep), args.adapt_from,
                         args.target, args.steps, args.actors, args.gpu)
        done = run_predict(job, args.address)
    if "adapt_loss_after" in done:
        how = f"{done['steps']} steps" if done["meta"] else "shared head -> its offsets solved, column new_group"
        print(f"adapted on the rows of {args.adapt_from} ({how}): their loss "
              f"{done['adapt_loss_before']:.4f} -> {done['adapt_loss_after']:.4f}")
        if anchors := done.get("anchors"):
            how = "each left out" if anchors["folds"] == anchors["rows"] else f"{anchors['folds']} folds"
            print(f"  each of those rows predicted from the others ({how}), MSE in {args.target}'s units: adapted "
                  f"{anchors['adapted']:.4g}, unadapted {anchors['unadapted']:.4g}, the others' mean "
                  f"{anchors['mean']:.4g}{'' if anchors['adapted'] < anchors['unadapted'] else '  <- adapting did not pay'}")
    for entry, new in done["new_groups"].items():
        print(f"entry '{entry}': rows routed by their group to its tasks, column '{entry}'"
              + (f"; {len(new)} group(s) the model was not trained on ({', '.join(new[:5])}"
                 f"{', ...' if len(new) > 5 else ''}) predicted by the shared head" if new else ""))
    print(f"wrote {done['rows']:,} rows of predictions to {args.out} in {done['seconds']:.1f} s")
    return EXIT_OK


def cmd_register(args) -> int:
    from distributed_mtml.model_log import register_model

    tracker = _tracker(args)
    tracker.check_store_exists()
    version = register_model(tracker, args.run, args.name)
    print(f"registered run {args.run}'s model as models:/{args.name}/{version.version}")
    return EXIT_OK


def cmd_demo(args) -> int:
    return cmd_train(args, DEMO_CONFIG, [])


def dispatch(args) -> int:
    """The command's function, set on its sub-parser (`set_defaults(func=...)`)."""
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    from distributed_mtml.interrupts import interrupt_on_signals, raise_if_swallowed, restore

    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        compat.set_environment(MTML_VERBOSE="1")  # runtime.cluster.VERBOSE_ENV, read where Ray starts
    # MLflow's INFO lines (database set-up) are not ours to show: the variable for when it is
    # imported later, the level for when it already is. Nor its progress bars of the artifacts
    # a command reads (a model's 100 files: a bar each step), drawn wherever tqdm is installed.
    compat.default_environment(MLFLOW_LOGGING_LEVEL="WARNING", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    compat.hold_mmap_threshold()  # see compat
    previous = interrupt_on_signals()
    try:
        code = dispatch(args)
        raise_if_swallowed()
        return code
    except InputError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:
        run = f"run {e.run_id}" if hasattr(e, "run_id") else "the MLflow run"
        print(f"interrupted: {run} is marked KILLED; continue it with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: a message, not a traceback wall
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILURE
    finally:
        restore(previous)
