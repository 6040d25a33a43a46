"""ruff (pyflakes, import order, bugbear) over the package, the tests and the jobs: clean."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "distributed_mtml", "tests", "jobs", "docs"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
