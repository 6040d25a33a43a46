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

from distributed_mtml import compat

_guarded = {"depth": 0, "pending": None, "raised": None}


def _interrupt(signum, frame):
    """KeyboardInterrupt now, or, inside `uninterrupted()`, as soon as it ends."""
    if _guarded["depth"]:
        _guarded["pending"] = signum
        return
    _raise(signum)


def _raise(signum: int) -> None:
    """KeyboardInterrupt, remembered for `raise_if_swallowed`."""
    _guarded["raised"] = signum
    raise KeyboardInterrupt(f"signal {signum}")


def raise_if_swallowed() -> None:
    """Raises again an interrupt that was raised and lost. A signal handler runs wherever the
    main thread is, and when that is a finalizer (a `__del__`, a weakref callback such as
    SQLAlchemy's, run by the garbage collector) Python prints the KeyboardInterrupt as
    "Exception ignored" and goes on: the command would finish as if Ctrl-C had not been
    pressed. Called where a run is about to be marked FINISHED and where a command returns."""
    if _guarded["raised"] is not None:
        raise KeyboardInterrupt(f"signal {_guarded['raised']}")


@contextlib.contextmanager
def uninterrupted():
    """A tracking write that Ctrl-C must not cut in half: an SQLite transaction left open keeps
    the database's write lock, and the KILLED status written next would then wait on it. The
    interrupt is delivered when the write is done. (Only our handlers defer; a second Ctrl-C
    while the clean-up runs is still abrupt.)"""
    _guarded["depth"] += 1
    try:
        yield
    finally:
        _guarded["depth"] -= 1
        pending, _guarded["pending"] = _guarded["pending"], None
        if pending is not None and not _guarded["depth"]:
            _raise(pending)


def interrupt_on_signals():
    """Installs the handler for SIGTERM and SIGINT in the main thread; returns the previous
    ones (None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}


@contextlib.contextmanager
def interrupt_trainer_on_sigint(trainer):
    """Around `trainer.fit()`: on SIGINT ask the Train controller to abort, without waiting, and
    raise KeyboardInterrupt at once, the path that marks the run KILLED. A second Ctrl-C
    interrupts the clean-up itself (abrupt, as a user pressing twice expects). The previous
    SIGINT handler is back afterwards. Yields the list that receives the controller's handle
    once the trainer starts it (for others that must abort the run)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    controllers: list = []

    def register(controller) -> None:
        controllers.append(controller)

        def handler(signum, frame):
            controller.abort.remote()
            _interrupt(signum, frame)

        signal.signal(signal.SIGINT, handler)

    compat.take_over_trainer_sigint(trainer, register)
    try:
        yield controllers
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def restore(previous: dict | None) -> None:
    """The handlers from before `interrupt_on_signals`; the interrupt it saw is forgotten (a
    command run again in this process starts clean)."""
    _guarded["raised"] = None
    if previous is not None and threading.current_thread() is threading.main_thread():
        for signum, handler in previous.items():
            signal.signal(signum, handler)
