import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from distributed_mtml.data.generators import make_suite

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))  # team_server
from team_server import free_port  # noqa: E402 - the one home of a free loopback port, for tests and benchmarks


@pytest.fixture
def seed_suite(tmp_path):
    path = str(tmp_path / "suite")
    make_suite("seed-example", path, {"rows": 200, "seed": 1})
    return path


def write_raw_suite(path: str, rows: int = 300, extra: str = "") -> str:
    """A suite as people have tables: no split column, string class labels, features and a
    regression target in very different units (thousands, ones, hundredths)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3)) * [1000, 1, 0.01] + [5000, 0, 3]
    columns = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}
    pq.write_table(pa.table({**columns, "label": np.where(x[:, 1] > 0, "yes", "no")}), f"{path}/cls.parquet")
    pq.write_table(pa.table({**columns, "price": x[:, 0] * 3 + x[:, 1] * 500}), f"{path}/reg.parquet")
    with open(f"{path}/suite.yaml", "w") as f:
        f.write("name: raw\n" + extra + "tasks:\n"
                "- {name: cls, type: classification, path: cls.parquet, target: label}\n"
                "- {name: reg, type: regression, path: reg.parquet, target: price}\n")
    return path


@pytest.fixture
def raw_suite(tmp_path):
    return write_raw_suite(str(tmp_path / "raw"))


def pytest_collection_modifyitems(items):
    """A test that takes the shared Ray is a `ray` test, marked or not."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_tests_are_marked(request):
    """The tiers hold: a test that leaves Ray running without the `ray` marker fails, so that
    `-m "not ray"` never starts Ray."""
    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if not before and running() and request.node.get_closest_marker("ray") is None:
        pytest.fail("this test started Ray: mark it `ray` (pytest.mark.ray)")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs seconds, so tests share it."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` on loopback with a SQLite backend, as a cluster's tracking server;
    it can be stopped and started again on the same port and database."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from mlflow.tracking import MlflowClient

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/server.db", "--artifacts-destination", str(self.root / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port)
        MlflowClient(self.uri).search_experiments()  # the server answers

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, at once
        self.proc.wait(timeout=30)


class Outage:
    """A TCP relay on its own loopback port in front of a server: `cut()` closes the port and
    drops open connections, so clients see the server go away (connection refused), and
    `restore()` listens again on the same port. Faster than restarting `mlflow server`, which
    takes half a minute on a loaded 2-core machine."""

    def __init__(self, target_port: int):
        self.target, self.port, self.listener, self.open = target_port, free_port(), None, []
        self.uri = f"http://127.0.0.1:{self.port}"
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        for s in self.open:
            s.close()
        self.open.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server.uri
    server.stop()


def logged_model_files(tracking_uri: str, run_id: str) -> set[str]:
    """The files of the run's MLflow model (`runs:/<id>/model`, an MLflow 3 logged model, which is
    not among the run's own artifacts)."""
    import mlflow

    from distributed_mtml.tracking import Tracker

    with Tracker(tracking_uri).active():  # MLflow resolves the model's id through its current URI
        return {a.path.split("/")[-1] for a in mlflow.artifacts.list_artifacts(artifact_uri=f"runs:/{run_id}/model")}
