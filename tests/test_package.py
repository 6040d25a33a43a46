"""The package as a user installs it from a wheel, outside any checkout: `mtml demo` must find
its config inside the package, not in a source tree."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), REPO], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("distributed_mtml-*.whl")
    venv = tmp_path / "venv"  # its own copy of the package; torch, Ray and MLflow from this Python
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    where = tmp_path / "elsewhere"
    where.mkdir()
    found = subprocess.run([python, "-c", "import distributed_mtml; print(distributed_mtml.__file__)"], cwd=where,
                           capture_output=True, text=True, check=True).stdout
    assert found.startswith(str(venv)), found  # the wheel's copy, not the checkout
    demo = subprocess.run([str(venv / "bin" / "mtml"), "demo"], cwd=where, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "[mtml] epoch 8/8" in demo.stdout and (where / "mlflow.db").exists()
