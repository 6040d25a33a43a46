import os

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
