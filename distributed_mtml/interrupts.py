"""SIGTERM takes the Ctrl-C path.

`ray job stop`, Kubernetes and most schedulers stop a driver with SIGTERM. Raising
KeyboardInterrupt for it lets the commands mark the MLflow run KILLED and leave the last
checkpoint for `--resume`. `ray.init` installs Ray's own SIGTERM handler (log and abort), so
the launcher installs this one again once Ray is up.
"""

from __future__ import annotations

import signal
import threading


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm():
    """Installs the handler in the main thread; returns the previous one (None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def restore(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
