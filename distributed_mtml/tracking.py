"""MLflow: where runs go, how they are named, their status, and the writes every command makes.

SQLite allows one writer at a time, so workers never talk to MLflow. The driver creates
the run and logs params and artifacts; during training a Ray Train callback in the controller
process (`runtime/callback.py`) logs every worker's metrics. The two never overlap.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from distributed_mtml import compat, store
from distributed_mtml.interrupts import raise_if_swallowed, uninterrupted

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_DB = "mlflow.db"
EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI's view of an experiment: training, not GenAI


def default_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """--tracking-uri, then the config, then $MLFLOW_TRACKING_URI, then ./mlflow.db.

    SQLite paths are made absolute here because Ray workers and the controller run in
    other working directories. Pure: no I/O.
    """
    uri = cli_uri or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    elif "://" not in uri:
        uri = "sqlite:///" + os.path.abspath(uri)
    return uri


CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def credentials_env() -> dict[str, str]:
    """The MLflow login this process was given ($MLFLOW_TRACKING_USERNAME and _PASSWORD, or
    _TOKEN): Ray's processes that log (the Train controller, Tune's trials) need it too."""
    return {k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)}


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer, or refuses this login, is bad input: say so
    before anything starts."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.request

    from distributed_mtml.errors import InputError

    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"--tracking-uri {uri}: the MLflow server does not answer ({reason})") from None
    login = credentials_env()
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1")
    if "MLFLOW_TRACKING_TOKEN" in login:
        request.add_header("Authorization", f"Bearer {login['MLFLOW_TRACKING_TOKEN']}")
    elif "MLFLOW_TRACKING_USERNAME" in login:
        pair = f"{login['MLFLOW_TRACKING_USERNAME']}:{login.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            who = f"user '{login['MLFLOW_TRACKING_USERNAME']}'" if "MLFLOW_TRACKING_USERNAME" in login else \
                "a token" if login else "no login"
            raise InputError(f"--tracking-uri {uri}: the MLflow server refused {who} (HTTP {e.code}: {_said(e)}); set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server") from None
    except (urllib.error.URLError, OSError):
        return  # it answered /health: what else fails is said by the first real call


def _said(error) -> str:
    """What a refusing server wrote: MLflow's JSON `message`, else the body's first line."""
    import json

    body = error.read().decode("utf-8", "replace").strip()
    try:
        return str(json.loads(body)["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return (body.splitlines() or [error.reason])[0][:200]


def _artifact_location(uri: str) -> str | None:
    """Next to a local SQLite file, artifacts go to ./mlartifacts beside it (absolute);
    a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


CONFIG_NAME = "mtml.config_name"


def unique_name(config_name: str) -> str:
    """A run's MLflow name: its config's name and a short random suffix, so that the runs of
    one config stay apart in the UI (the tag `mtml.config_name` keeps what they share)."""
    import secrets

    return f"{config_name}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Tracker:
    """Where one command's runs go, and every MLflow write it makes.

    A command resolves its tracking URI once (`Tracker.resolve`) and hands this object down;
    nothing below it looks at $MLFLOW_TRACKING_URI or the config again. It holds only the URI,
    so it travels to the Ray Train controller and Tune's callbacks as it is."""

    uri: str

    @classmethod
    def resolve(cls, cli_uri: str | None = None, config_uri: str | None = None) -> "Tracker":
        """The tracker a command uses (see `default_tracking_uri` for the order), checked to
        answer when it is a server."""
        uri = default_tracking_uri(cli_uri, config_uri)
        check_reachable(uri)
        return cls(uri)

    def __str__(self) -> str:
        return self.uri

    LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default

    def run_page(self, run_id: str) -> str:
        """The address of the run's own page in the MLflow UI: the server's for a tracking server,
        `mlflow ui`'s default otherwise. (MLflow 3.17's UI opens an experiment on its GenAI
        overview, where training runs are a tab away: this goes straight to the run.)"""
        experiment = self.client().get_run(run_id).info.experiment_id
        ui = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else self.LOCAL_UI
        return f"{ui}/#/experiments/{experiment}/runs/{run_id}"

    def client(self):
        """MLflow's client of this store; a local SQLite file is created (or checked) first,
        once a process, under its lock (`store.ready`)."""
        from mlflow.tracking import MlflowClient

        store.ready(self.uri)
        return MlflowClient(tracking_uri=self.uri)

    @contextlib.contextmanager
    def active(self, experiment_id: str | None = None) -> Iterator[None]:
        """MLflow's current tracking URI (and so its registry's), and experiment, set to this
        tracker's for the block: logging a model and resolving `runs:/` and `models:/` URIs go
        through them, whatever URI is passed. MLflow also exports both as $MLFLOW_TRACKING_URI
        and $MLFLOW_EXPERIMENT_ID, which every later command of this process and its subprocesses
        would take: the variables are restored after."""
        import mlflow

        store.ready(self.uri)
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            with compat.environment(MLFLOW_EXPERIMENT_ID=os.environ.get("MLFLOW_EXPERIMENT_ID")):
                if experiment_id is not None:
                    mlflow.set_experiment(experiment_id=experiment_id)  # sets MLFLOW_EXPERIMENT_ID
                yield
        finally:
            mlflow.set_tracking_uri(before)  # None: unset again

    def check_store_exists(self) -> None:
        """Reading runs from a SQLite file that is not there would create an empty one: say
        where none was found instead."""
        if self.uri.startswith("sqlite:///") and not os.path.exists(self.uri[len("sqlite:///"):]):
            from distributed_mtml.errors import InputError

            raise InputError(f"--tracking-uri: no MLflow database at {self.uri[len('sqlite:///'):]} "
                             "(pass --tracking-uri where the run was logged)")

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if new, and tagged so that the MLflow UI opens it in its
        model-training view (left unset, the UI guesses from the first runs it sees)."""
        from mlflow.exceptions import MlflowException

        c = self.client()
        exp = c.get_experiment_by_name(name)
        if exp is None:
            try:
                exp = c.get_experiment(c.create_experiment(name, artifact_location=_artifact_location(self.uri)))
            except MlflowException:  # another run created it since: use that one
                exp = c.get_experiment_by_name(name)
                if exp is None:
                    raise
        if EXPERIMENT_KIND not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id

    def newest_run_of(self, experiment: str, config_name: str, status: str):
        """The newest run of a config in `experiment` whose status matches `status` (a filter
        clause), found by its `mtml.config_name` tag, or by its name for runs older than the tag."""
        c = self.client()
        exp = c.get_experiment_by_name(experiment)
        for key in (CONFIG_NAME, "mlflow.runName"):  # MLflow's filter has no OR
            runs = [] if exp is None else c.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{key}` = '{config_name}' and {status}",
                order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                return runs[0]
        return None

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                   config_name: str | None = None) -> str:
        """A run named `run_name`; with `config_name` (a command's own run) named `unique_name`
        of it instead and tagged `mtml.config_name`, which `--resume` and `transfer.source` look up."""
        from mlflow.entities import Param

        store.check_writable(self.uri)
        with uninterrupted():  # a Ctrl-C mid-transaction would keep SQLite's write lock
            c = self.client()
            if config_name is not None:
                run_name, tags = unique_name(config_name), {CONFIG_NAME: config_name, **tags}
            run = c.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                c.log_batch(run.info.run_id, params=items[i : i + 100])
            return run.info.run_id

    def find_resumable_run(self, experiment: str, config_name: str) -> str | None:
        """The newest unfinished run of this config: what `--resume` continues."""
        run = self.newest_run_of(experiment, config_name, "attributes.status != 'FINISHED'")
        return run.info.run_id if run else None

    def set_status(self, run_id: str, status: str) -> None:
        """FINISHED, FAILED or KILLED; RUNNING again when a run is resumed."""
        store.check_writable(self.uri)
        with uninterrupted():
            c = self.client()
            if status == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=status)

    def end_children(self, parent: str, status: str) -> None:
        """Marks the parent's child runs that are still RUNNING (trials cut off) with `status`."""
        with uninterrupted():
            c = self.client()
            experiment = c.get_run(parent).info.experiment_id
            for run in c.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"):
                c.set_terminated(run.info.run_id, status=status)

    @contextlib.contextmanager
    def final_status(self, run_id: str):
        """The run's status once the block ends: FINISHED when it completes (or exits cleanly:
        Tune ends a trial it stops, a search's run, by `sys.exit(0)`), KILLED on Ctrl-C or
        SIGTERM (its child runs still RUNNING too), FAILED on anything else."""
        status = "FAILED"
        try:
            yield
            raise_if_swallowed()
            status = "FINISHED"
        except SystemExit as stop:
            if stop.code in (0, None):
                status = "FINISHED"
            raise
        except KeyboardInterrupt as interrupt:
            status = "KILLED"
            self.end_children(run_id, status)
            interrupt.run_id = run_id  # the outermost run, for the command's last line
            raise
        finally:
            self.set_status(run_id, status)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None,
                    model_id: str | None = None) -> None:
        """`model_id`: the metrics are also the MLflow model's (shown with it in the UI)."""
        from mlflow.entities import Metric

        with uninterrupted():
            now = timestamp_ms or int(time.time() * 1000)
            items = [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
            c = self.client()
            for i in range(0, len(items), 500):
                c.log_batch(run_id, metrics=items[i : i + 500])

    def log_datasets(self, run_id: str, datasets: list[tuple[str, str, str, pa.Schema]],
                     context: str = "training") -> None:
        """Dataset inputs of the run, which the UI's Dataset column shows: (name, source URI,
        digest, pyarrow schema) each."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for name, source, digest, schema in datasets:
            with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all local
                warnings.simplefilter("ignore", UserWarning)
                where = resolve_dataset_source(source)
            dataset = MetaDataset(where, name=name, digest=digest, schema=_mlflow_schema(schema))
            inputs.append(DatasetInput(compat.mlflow_dataset_entity(dataset), [InputTag("mlflow.data.context", context)]))
        with uninterrupted():
            self.client().log_inputs(run_id, datasets=inputs)


def _mlflow_schema(schema: pa.Schema):
    """A Parquet schema as MLflow's column specs (a type MLflow has no name for: string)."""
    import pyarrow as pa  # noqa: F811 (the module itself, not only its types)
    from mlflow.types import ColSpec, Schema

    def kind(t: pa.DataType) -> str:
        if pa.types.is_floating(t):
            return "float" if t.bit_width == 32 else "double"
        if pa.types.is_integer(t):
            return "integer" if t.bit_width <= 32 else "long"
        return "boolean" if pa.types.is_boolean(t) else "string"

    return Schema([ColSpec(kind(f.type), f.name) for f in schema])
