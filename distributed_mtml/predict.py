"""The trained model in use: a table of rows in, a table of predictions out.

`Predictor` is what every way of using a model shares: the MLflow pyfunc model (`mtml_pyfunc.py`),
`mlflow models serve`, and `mtml predict`'s Ray Data actors. It reads the model's own weights
(`torch.load(weights_only=True)`) and its preprocessing, so rows go in raw, as in the suite's
Parquet, and predictions come out in the target's units and classes by name:

- regression task `t`: column `t`;
- classification task `t`: column `t` (the class: its name for string labels, else its index)
  and `t_proba_<class>` per class.

Tasks with different feature columns read one table: its columns are the union of the tasks',
and each task reads its own. A task whose columns a table lacks gets no output (`tasks` picks
tasks explicitly). A meta-learned model has one head, `meta`: its starting point for any task
of its family; `adapt` first takes inner steps on a few labelled rows of the new task. A
multi-task model whose regression tasks share a head (`model.heads: shared_plus_offset`) adapts
to a new group, `new_group`, from its labelled rows: the shared head plus offsets solved in
closed form with the penalty it learned (a mixed model's BLUP for a new group), on the model's
saved statistics only (nothing of the new rows but their K labels).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs  # noqa: F401 (pa.fs)
import torch

from distributed_mtml.artifacts import load_with_learner
from distributed_mtml.config import ModelConfig
from distributed_mtml.data.prepare import TaskPrep, standardizes
from distributed_mtml.data.scan import open_parquet
from distributed_mtml.data.suite import group_order
from distributed_mtml.errors import InputError
from distributed_mtml.evaluate import forward_in_chunks
from distributed_mtml.models import META_TASK, TaskShape, new_task
from distributed_mtml.runtime.checkpoint import load_state

ADAPT_STEPS = 10  # inner steps on the labelled rows unless told: meta evaluation's default curve
NOT_META = ("--adapt-from: the model is neither meta-learned nor a multi-task model with a shared regression head "
            "(model.heads: shared_plus_offset); carry it to a new task with mtml transfer")
NEW_GROUP = "new_group"  # the task a multi-task model with a shared head adapts to
LEAVE_ONE_OUT_ROWS = 20  # up to this many labelled rows the anchors leave each one out; more: 10 folds


class Predictor:
    """A trained model (a model directory: checkpoint or MLflow model weights) as a function of
    pandas tables."""

    def __init__(self, directory: str, device: str = "cpu"):
        model, plan, self.learner = load_with_learner(directory)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.features = _features_of(plan)
        config = plan.get("config", {})
        # a meta-learned model standardises a new task by its labelled rows, as each episode was by
        # its support rows (`data.standardize: task`); under `suite` by the statistics saved with it
        self.own_statistics = plan.get("source") == "suite" and plan.get("prep") is None and standardizes(
            config.get("data", {}).get("standardize", True))
        self.shapes: dict[str, TaskShape] = dict(model.tasks)
        self.preps: dict[str, TaskPrep] = {n: model.preprocessing.get(n) or TaskPrep() for n in self.shapes}
        self.params = None  # a meta-learned model's adapted parameters, once `adapt` ran
        self.heads = config.get("model", {}).get("heads", "separate")
        self.new_head: torch.nn.Module | None = None  # a new group's task module (`models.new_task`) once adapted
        self.groups: dict[str, dict] = plan.get("groups") or {}  # grouped entries: how rows are routed to tasks
        self.model_config = config.get("model", {})
        self.shared_head: dict[str, torch.nn.Module] = {}  # entry -> the task module (`models.new_task`) for unseen groups
        # a meta-learned model's default inner steps: those that did best on its validation tasks
        self.adapt_steps = int(load_state(directory).get("adapt_steps", ADAPT_STEPS))

    @property
    def tasks(self) -> list[str]:
        return list(self.shapes)

    def input_columns(self) -> list[str]:
        """Every task's feature columns, in the order the tasks first name them."""
        return list(dict.fromkeys(c for task in self.tasks for c in self.features[task]))

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        """`tasks` if the model has them all (every task for None); InputError naming the others."""
        unknown = [t for t in tasks or [] if t not in self.shapes]
        if unknown:
            raise InputError(f"--tasks: the model has no task {unknown} (it has: {', '.join(self.tasks)})")
        return tasks or self.tasks

    def missing_columns(self, columns: list[str], tasks: list[str]) -> list[str]:
        """The feature columns of `tasks` that a table of `columns` lacks."""
        return [c for task in tasks for c in self.features[task] if c not in columns]

    def predict(self, table: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
        """One row of predictions per row of `table`; tasks whose columns it lacks are left out
        unless named in `tasks` (then a missing column is an InputError naming it). A grouped
        entry's tasks are not columns of their own: where the table has the entry's group column,
        each row is predicted by its group's task, in column `<entry>` (`routed`)."""
        routed = [] if tasks else [e for e, route in self.groups.items() if route["column"] in table.columns]
        tasks = self.check_tasks(tasks) if tasks else [
            t for t in self.ungrouped() if not self.missing_columns(list(table.columns), [t])]
        missing = self.missing_columns(list(table.columns), [*tasks, *(self.entry_source(e) for e in routed)])
        if missing:
            raise InputError(f"the input has no column {missing[0]!r}, a feature of the model (it reads: "
                             f"{', '.join(self.input_columns())})")
        out = {}
        for task in tasks:
            out.update(self._task_outputs(task, self._inputs(task, table)))
        frame = pd.DataFrame(out, index=table.index)
        return pd.concat([frame, *(self.routed(entry, table) for entry in routed)], axis=1)

    def ungrouped(self) -> list[str]:
        """The tasks that are columns of their own by default: all but a grouped entry's."""
        in_groups = {t for route in self.groups.values() for t in route["tasks"].values()}
        return [t for t in self.tasks if t not in in_groups]

    def entry_source(self, entry: str) -> str:
        """A grouped entry's first task: every task of an entry reads the same columns."""
        return next(iter(self.groups[entry]["tasks"].values()))

    def unseen(self, entry: str, values: list) -> list[str]:
        """The group values of `values` the entry was not trained on (they are predicted by the
        shared head, `shared_forward`); InputError when the model has none to predict them with."""
        new = sorted({str(v) for v in values} - set(self.groups[entry]["tasks"]))
        if new:
            self.shared_forward(entry, new)
        return new

    def routed(self, entry: str, table: pd.DataFrame) -> pd.DataFrame:
        """Column `<entry>` (and `<entry>_proba_<class>`): each row predicted by the task of its
        group value; a value the model was not trained on by the shared head (`unseen`)."""
        route = self.groups[entry]
        codes, values = pd.factorize(table[route["column"]].astype(str), sort=False)
        order, bounds = group_order(codes, len(values))
        parts = []
        for k, value in enumerate(values):
            rows = order[bounds[k] : bounds[k + 1]]
            task = route["tasks"].get(value)
            source = task or self.entry_source(entry)
            forward = None if task else self.shared_forward(entry, [value])
            outputs = self._task_outputs(source, self._inputs(source, table.iloc[rows]), forward)
            parts.append(pd.DataFrame({entry + name[len(source):]: v for name, v in outputs.items()}, index=rows))
        out = pd.concat(parts).sort_index() if parts else pd.DataFrame(index=range(0))
        out.index = table.index
        return out

    def shared_forward(self, entry: str, new: list[str]):
        """How a group the model was not trained on is predicted: the shared head of the entry's
        tasks (offsets or embedding at zero: what its tasks have in common, a mixed model's
        prediction for a new group), through the entry's trunk and adapter. InputError where the
        model shares no head, or where its tasks' preprocessing differs (`data.standardize: task`:
        a new group's scale is not known)."""
        from distributed_mtml.models import new_task_head, trunk_input_width

        if entry not in self.shared_head:
            route, source = self.groups[entry], self.entry_source(entry)
            cfg = ModelConfig.model_validate(self.model_config)
            preps = {self.preps[t].model_dump_json() for t in route["tasks"].values()}
            unknown = f"group column '{route['column']}' has value(s) {new[:5]} the model was not trained on (entry '{entry}')"
            if cfg.heads == "separate":
                raise InputError(f"{unknown}, and its tasks share no head (model.heads: separate) to predict a new "
                                 "group with; adapt one with --adapt-from, or train with model.heads: shared_plus_offset")
            if len(preps) > 1:
                raise InputError(f"{unknown}, and its tasks were standardised each by its own statistics "
                                 "(data.standardize: task), so a new group's scale is not known")
            shapes = list(self.model.tasks.values())
            head = new_task_head(cfg, self.shapes[source], self.model.shared_heads, trunk_input_width(cfg, shapes))
            known = [self.model.task_modules[t] for t in route["tasks"].values()]
            module = new_task(cfg, known, self.model.task_modules[source].adapter, head)
            self.shared_head[entry] = module.to(self.device).eval()
        module = self.shared_head[entry]
        return lambda x: module(self.model.trunk, x)

    def _inputs(self, task: str, table: pd.DataFrame) -> torch.Tensor:
        x = table[self.features[task]].to_numpy(dtype=np.float32)
        return torch.from_numpy(self.preps[task].inputs(x)).to(self.device)

    def _task_outputs(self, task: str, x: torch.Tensor, forward=None) -> dict[str, np.ndarray]:
        """`task`'s columns for inputs `x`: by its own head, or by `forward` with its outputs' form."""
        forward = forward or (lambda chunk: self._forward(task, chunk))
        output = forward_in_chunks(forward, x).float().cpu()
        if self.shapes[task].type == "regression":
            return {task: self.preps[task].target_units(output.squeeze(-1).double()).numpy()}
        probs = output.softmax(-1).numpy()
        names = self._class_names(task)
        best = probs.argmax(-1)
        out = {task: np.asarray(names, dtype=object)[best] if self.preps[task].classes else best}
        out.update({f"{task}_proba_{c}": probs[:, k] for k, c in enumerate(names)})
        return out

    def _forward(self, task: str, x: torch.Tensor) -> torch.Tensor:
        if self.params is not None:
            return self.learner.outputs(self.params, x)
        if task == NEW_GROUP and self.new_head is not None:
            return self.new_head(self.model.trunk, x)
        return self.model(task, x)

    def adapt_features(self) -> list[str]:
        """The feature columns the labelled rows of a new task must have."""
        if self.learner is not None:
            return self.features[META_TASK]
        return self.features[self.group_source()]

    def group_source(self) -> str:
        """The trained task a new group starts from: a regression task of the shared head (its
        saved statistics are the suite's pooled ones under `data.standardize: suite`). Every task
        of that head must read the same columns, which the new group's rows then have."""
        group = self._group()
        if self.heads != "shared_plus_offset" or not group:
            raise InputError(NOT_META)
        if len({tuple(self.features[n]) for n in group}) > 1:
            raise InputError("--adapt-from: the model's regression tasks read different feature columns, so a new "
                             "group's columns are not known")
        return group[0]

    def _group(self) -> list[str]:
        """The trained tasks of the shared regression head (`group_source`'s)."""
        return [n for n, s in self.shapes.items() if n != NEW_GROUP and s.type == "regression" and s.out_width == 1]

    def _adapt_group(self, labelled: pd.DataFrame, target: str, steps: int) -> float:
        """A new group's head from its labelled rows (see the module's docstring); `steps` 0: the
        shared head alone (the 0-shot prediction). Returns the rows' loss on the model's scale."""
        from distributed_mtml.heads import group_key, shared_plus_offset

        source = self.group_source()
        features, prep = self.features[source], self.preps[source]
        own = self.model.task_modules[source]
        y = labelled[target].to_numpy(dtype=np.float32)
        xs = torch.from_numpy(prep.inputs(labelled[features].to_numpy(dtype=np.float32))).to(self.device)
        ys = torch.from_numpy(np.asarray(prep.scaled_target(y), dtype=np.float32)).to(self.device)
        lam = float(own.head.lam)
        head = shared_plus_offset.OffsetHead(self.model.shared_heads[group_key("regression", 1)], lam, len(y))
        head.precision.copy_(own.head.precision)  # the penalty per input the model learned
        cfg = ModelConfig.model_validate(self.model_config)
        module = new_task(cfg, [self.model.task_modules[n] for n in self._group()], own.adapter, head).to(self.device)
        with torch.no_grad():
            inputs = own.adapter(xs)
            f = module.features(inputs, self.model.trunk(inputs))
            if steps > 0:
                shared_plus_offset.solve_offsets(head, f, ys)
            loss = float(((head(f).squeeze(-1) - ys) ** 2).mean())
        self.shapes[NEW_GROUP] = TaskShape(NEW_GROUP, "regression", len(features))
        self.features[NEW_GROUP], self.preps[NEW_GROUP], self.new_head = features, prep, module
        return loss

    def anchors(self, labelled: pd.DataFrame, target: str, steps: int) -> dict[str, float] | None:
        """What adapting on the labelled rows is worth, measured on them honestly: each row (or
        fold, over `LEAVE_ONE_OUT_ROWS` rows) predicted by the model adapted on the others, beside
        the model unadapted (0 steps: the shared head, or the meta-learned start) and the mean of
        the others' targets. Mean squared errors in the target's units, the folds and rows; None for a
        classification model or fewer than 3 rows. The predictor is left adapted on the last
        fold: adapt on every row after this."""
        column = NEW_GROUP if self.learner is None else META_TASK
        if len(labelled) < 3 or (self.learner is not None and self.shapes[META_TASK].type != "regression"):
            return None
        folds = len(labelled) if len(labelled) <= LEAVE_ONE_OUT_ROWS else 10
        fold = np.random.default_rng(0).permutation(len(labelled)) % folds
        errors = {"adapted": 0.0, "unadapted": 0.0, "mean": 0.0}
        truth = labelled[target].to_numpy(dtype=np.float64)
        for k in range(folds):
            rest, held = labelled[fold != k], labelled[fold == k]
            for name, count in (("unadapted", 0), ("adapted", steps)):
                self.adapt(rest, target, count)
                errors[name] += float(((self.predict(held, [column])[column].to_numpy() - truth[fold == k]) ** 2).sum())
            errors["mean"] += float(((rest[target].mean() - truth[fold == k]) ** 2).sum())
        return {**{k: v / len(labelled) for k, v in errors.items()}, "folds": folds, "rows": len(labelled)}

    def _class_names(self, task: str) -> list:
        return self.preps[task].classes or list(range(self.shapes[task].num_classes))

    def adapt(self, labelled: pd.DataFrame, target: str, steps: int = ADAPT_STEPS) -> float:
        """Adapts a meta-learned model to a new task from its labelled rows, with the model's own
        inner rule (the parameters it adapts, at its rates: ANIL the head, Meta-SGD its learned
        rates), as in meta-training, and the same transform: the statistics saved with the model
        (`data.standardize: suite`) or the labelled rows' own (`meta.tasks.support_prep`, as each
        episode was by its support rows). Returns the labelled rows' loss after adapting."""
        from distributed_mtml.meta.algorithms import adapt
        from distributed_mtml.meta.tasks import support_prep

        if self.learner is None:
            return self._adapt_group(labelled, target, steps)
        missing = [c for c in [*self.features[META_TASK], target] if c not in labelled.columns]
        if missing:
            raise InputError(f"--adapt-from: no column {missing[0]!r} (the model reads {', '.join(self.features[META_TASK])})")
        x = labelled[self.features[META_TASK]].to_numpy(dtype=np.float32)
        y = labelled[target].to_numpy()
        if self.shapes[META_TASK].type == "classification" and y.dtype.kind not in "iu":
            raise InputError(f"--target {target}: class indices (integers) expected, found {y.dtype}")
        regression = self.shapes[META_TASK].type == "regression"
        if self.own_statistics:
            self.preps[META_TASK] = support_prep(x, y.astype(np.float32) if regression else y)
        prep = self.preps[META_TASK]
        xs = torch.from_numpy(prep.inputs(x)).to(self.device)
        ys = torch.as_tensor(np.asarray(prep.scaled_target(y.astype(np.float32 if y.dtype.kind == "f" else np.int64))))
        ys = ys.to(self.device)
        self.params = {n: p.detach() for n, p in adapt(self.learner, self.learner.params(), xs, ys, steps, True).items()}
        with torch.no_grad():
            return float(self.learner.loss(self.params, xs, ys))


def _features_of(plan: dict) -> dict[str, list[str]]:
    """Each task's feature columns, as the plan saved them (a meta plan: its one head's)."""
    features = plan.get("features")
    if not features:
        raise InputError("the model's plan names no feature columns: it was trained before `mtml predict` "
                         "existed (train it again to predict with it)")
    return {META_TASK: features} if plan.get("source") in ("family", "suite") else features


BATCH_ROWS = 4096  # rows per map_batches call: large enough that a forward pass amortises its overhead


def model_files(directory: str) -> dict[str, bytes]:
    """The model directory's files as bytes, which travel to the actors through Ray's object store
    (an actor may run on a node that cannot read the driver's disk or the tracking store)."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
            if name.endswith(".pt")}


class PredictActor:
    """One actor of `mtml predict`'s pool: holds the model, answers a pandas batch with its
    predictions and the kept columns. A meta-learned model adapts once, at the start, exactly as
    the driver did (the same rows, the same deterministic inner steps)."""

    def __init__(self, files: dict[str, bytes], tasks: list[str] | None, keep: list[str], use_gpu: bool,
                 adapt_rows: pd.DataFrame | None, target: str | None, steps: int):
        directory = tempfile.mkdtemp(prefix="mtml-model-")
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        self.predictor = Predictor(directory, "cuda" if use_gpu else "cpu")
        if adapt_rows is not None:
            self.predictor.adapt(adapt_rows, target, steps)
        self.tasks, self.keep = tasks, keep

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.answer(self.predictor, batch, self.tasks, self.keep)

    @staticmethod
    def answer(predictor: Predictor, batch: pd.DataFrame, tasks: list[str] | None, keep: list[str]) -> pd.DataFrame:
        """A batch's predictions and its kept columns."""
        out = predictor.predict(batch, tasks)
        for column in keep:
            out[column] = batch[column].to_numpy()
        return out


@dataclass
class PredictJob:
    """What `mtml predict` was asked: the model (a local directory by now), the Parquet input
    (a file, directory or any pyarrow filesystem URI), the output directory, and options."""

    model_dir: str
    input: str
    out: str
    tasks: list[str] | None = None
    keep: list[str] = field(default_factory=list)
    adapt_from: str | None = None
    target: str | None = None
    steps: int | None = None  # None: the model's own (`Predictor.adapt_steps`)
    actors: int = 1
    use_gpu: bool = False


def check_job(job: PredictJob, predictor: Predictor) -> tuple[list[str], pd.DataFrame | None]:
    """Every problem of the input found before any work, InputError naming the column: returns
    the tasks to predict and the labelled rows to adapt from."""
    from distributed_mtml.data.suite import filesystem

    new_group = job.adapt_from is not None and predictor.learner is None  # a multi-task model adapts a new group
    tasks = predictor.check_tasks(job.tasks) if job.tasks else [] if new_group else predictor.ungrouped()
    schema = _parquet_schema(job.input, "--input")
    missing = predictor.missing_columns(schema.names, [*tasks, *([predictor.group_source()] if new_group else [])])
    if missing:
        raise InputError(f"--input {job.input}: no column {missing[0]!r}, a feature of task "
                         f"'{next(t for t in tasks if missing[0] in predictor.features[t])}' (--tasks picks tasks)")
    absent = [c for c in job.keep if c not in schema.names]
    if absent:
        raise InputError(f"--keep: --input {job.input} has no column {absent[0]!r}")
    for column in dict.fromkeys(c for t in tasks for c in predictor.features[t]):
        kind = schema.field(column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise InputError(f"--input {job.input}: column {column!r} is {kind}, a feature must be numeric")
    fs, out = filesystem(job.out)
    if fs.get_file_info(out).type != pa.fs.FileType.NotFound and fs.get_file_info(pa.fs.FileSelector(out)):
        raise InputError(f"--out {job.out}: exists and is not empty (predictions go to a new directory)")
    if job.adapt_from is None:
        return tasks, None
    if job.target is None:
        raise InputError("--adapt-from needs --target, the labelled rows' target column")
    if job.steps is not None and job.steps < 0:
        raise InputError("--steps: must be 0 or more")
    labelled = _parquet_schema(job.adapt_from, "--adapt-from")
    wanted = [*predictor.adapt_features(), job.target]
    absent = [c for c in wanted if c not in labelled.names]
    if absent:
        raise InputError(f"--adapt-from {job.adapt_from}: no column {absent[0]!r}")
    rows = open_parquet(job.adapt_from).to_table(columns=wanted).to_pandas()
    return ([NEW_GROUP, *tasks] if new_group else tasks), rows


def _unseen_groups(job: PredictJob, predictor: Predictor) -> dict[str, list[str]]:
    """Per grouped entry the input routes (`Predictor.routed`), the group values it holds that the
    model was not trained on: found before any row is predicted, so that a model that cannot
    predict them stops here (InputError)."""
    if job.tasks or job.adapt_from:
        return {}
    data = open_parquet(job.input)
    found = {}
    for entry, route in predictor.groups.items():
        if route["column"] in data.schema.names:
            values = data.to_table(columns=[route["column"]]).column(route["column"]).unique().to_pylist()
            found[entry] = predictor.unseen(entry, values)
    return found


def _parquet_schema(path: str, flag: str) -> pa.Schema:
    try:
        return open_parquet(path).schema
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{flag} {path}: cannot read Parquet ({str(e).splitlines()[0][:200]})") from None


def run_predict(job: PredictJob, address: str | None) -> dict[str, float]:
    """Predicts every row of `job.input`: a table of one batch in this process (a new group's
    few hundred rows, once per group, need no Ray), a larger one with Ray Data: read_parquet ->
    map_batches on a pool of actors that hold the model -> write_parquet. Returns what it did
    (rows, seconds, and the labelled rows' loss before and after adaptation)."""
    predictor = Predictor(job.model_dir)
    tasks, labelled = check_job(job, predictor)
    facts: dict = {"meta": predictor.learner is not None, "new_groups": _unseen_groups(job, predictor)}
    if labelled is not None:
        job = replace(job, steps=predictor.adapt_steps if job.steps is None else job.steps)  # the actors adapt alike
        facts["anchors"] = predictor.anchors(labelled, job.target, job.steps)
        facts["adapt_loss_before"] = predictor.adapt(labelled, job.target, 0)
        facts["adapt_loss_after"] = predictor.adapt(labelled, job.target, job.steps)
        facts["steps"] = job.steps
    routed = [c for e in facts["new_groups"] for c in [predictor.groups[e]["column"], *predictor.features[predictor.entry_source(e)]]]
    columns = list(dict.fromkeys([*(c for t in tasks for c in predictor.features[t]), *job.keep, *routed]))
    begin = time.perf_counter()
    tasks = tasks if job.tasks or labelled is not None else None  # None: the default columns, grouped entries routed
    if address is None and job.actors == 1 and not job.use_gpu and open_parquet(job.input).count_rows() <= BATCH_ROWS:
        _predict_here(job, predictor, tasks, columns)
        return {**facts, "rows": open_parquet(job.out).count_rows(), "seconds": time.perf_counter() - begin}
    return {**facts, **_predict_with_ray_data(job, address, tasks, labelled, columns), "seconds": time.perf_counter() - begin}


def _predict_here(job: PredictJob, predictor: Predictor, tasks: list[str], columns: list[str]) -> None:
    """One batch, predicted by the (already adapted) predictor of this process, written as one file."""
    import pyarrow.parquet as pq

    from distributed_mtml.data.suite import filesystem

    table = open_parquet(job.input).to_table(columns=columns).to_pandas()
    out = PredictActor.answer(predictor, table, tasks, job.keep)
    fs, inner = filesystem(job.out)
    fs.create_dir(inner, recursive=True)
    pq.write_table(pa.Table.from_pandas(out, preserve_index=False), f"{inner}/part-0.parquet", filesystem=fs)


def _predict_with_ray_data(job: PredictJob, address: str | None, tasks: list[str], labelled: pd.DataFrame | None,
                           columns: list[str]) -> dict[str, float]:
    import ray.data

    from distributed_mtml.data.suite import filesystem
    from distributed_mtml.runtime.cluster import ensure_ray

    ensure_ray(address)
    fs, inner = filesystem(job.input)
    ds = ray.data.read_parquet(inner, filesystem=fs, columns=columns)
    ds = ds.map_batches(PredictActor, batch_format="pandas", batch_size=BATCH_ROWS,
                        fn_constructor_args=(model_files(job.model_dir), tasks, job.keep, job.use_gpu,
                                             labelled, job.target, job.steps),
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=job.actors),
                        num_cpus=0 if job.use_gpu else 1, num_gpus=1 if job.use_gpu else 0)
    out_fs, out = filesystem(job.out)
    ds.write_parquet(out, filesystem=out_fs)
    return {"rows": open_parquet(job.out).count_rows()}  # from the footers
