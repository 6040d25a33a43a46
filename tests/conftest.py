import os
import socket
import subprocess
import sys
import time

import pytest

from distributed_mtml.data.generators import make_suite


@pytest.fixture
def seed_suite(tmp_path):
    path = str(tmp_path / "suite")
    make_suite("seed-example", path, {"rows": 200, "seed": 1})
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs seconds, so tests share it."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with a SQLite backend, as a cluster's tracking server."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    MlflowClient(uri).search_experiments()  # the server answers
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
