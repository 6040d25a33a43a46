"""The package's layering: no import circle, nothing in `data/` importing `runtime/`
(`jobs/module_map.py --check`), and the fragile parts in `compat` alone."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_circle_and_no_upward_import():
    out = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "module_map.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_private_apis_and_process_tweaks_only_in_compat():
    """Ray's and MLflow's private modules, glibc, and writes to os.environ go through
    `distributed_mtml/compat.py`, where each is checked and pinned by test_compat."""
    fragile = re.compile(r"ray\._private|_internal\b|\._to_mlflow_entity|_register_sigint_handler|ctypes|mallopt"
                         r"|mlflow\.store\.db\.utils"
                         r"|os\.environ\[[^]]+\]\s*=|os\.environ\.(update|setdefault|pop)\(|/proc/")
    found = []
    for directory, _, names in os.walk(os.path.join(REPO, "distributed_mtml")):
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and not path.endswith(os.path.join("distributed_mtml", "compat.py")):
                with open(path, encoding="utf-8") as f:
                    found += [f"{path}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if fragile.search(line)]
    assert not found, "\n".join(found)
