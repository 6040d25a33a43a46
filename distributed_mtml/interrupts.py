"""Ctrl-C and SIGTERM end a run as KILLED, at once, with its checkpoints kept.

`ray job stop`, Kubernetes and most schedulers stop a driver with SIGTERM. Raising
KeyboardInterrupt for it lets the commands mark the MLflow run KILLED and leave the last
checkpoint for `--resume`. `ray.init` installs Ray's own SIGTERM handler (log and abort), so
the launcher installs this one again once Ray is up.

Ctrl-C (SIGINT to the whole process group) is the same, but Ray Train's `fit()` installs its
own SIGINT handler, which waits for the controller to abort while the workers, which got the
SIGINT too, fail: the run ended FAILED about 12 s later. `interrupt_trainer_on_sigint` puts
ours in its place (through the trainer's one registration hook, a private method).
"""

from __future__ import annotations

import contextlib
import signal
import threading


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm():
    """Installs the handler in the main thread; returns the previous one (None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def interrupt_trainer_on_sigint(trainer):
    """Around `trainer.fit()`: on SIGINT ask the Train controller to abort, without waiting, and
    raise KeyboardInterrupt at once, the path that marks the run KILLED. A second Ctrl-C
    interrupts the clean-up itself (abrupt, as a user pressing twice expects). The previous
    SIGINT handler is back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None

    def register(controller) -> None:
        def handler(signum, frame):
            controller.abort.remote()
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGINT, handler)

    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = register
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def restore(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
