"""Lines for the user's terminal from wherever a command's work runs.

Ray forwards everything its actors write to stdout and stderr to the driver's terminal, and with
our progress lines come Ray's own: C++ warnings about actor restarts, tracebacks of Ray Train's
placement-group cleaner, each prefixed with `(TrainController pid=...)`. A command therefore
starts Ray with that forwarding off (on with `--verbose`; Ray's session logs keep it all either
way), and the few lines meant for the user travel explicitly: the process that has one calls
`say`, which hands it to a small console actor, and a thread in the command's own process prints
what arrives there.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

ENV = "MTML_CONSOLE"  # names the console actor in the processes of a run's workers

_handles: dict[str, object] = {}


def _console_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Console:
        """Lines said since the driver last took them."""

        def __init__(self):
            self.lines: list[str] = []

        def put(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    return Console


def progress_line(what: str, done: int, total: int, parts: list[str], prefix: str = "[mtml]") -> str:
    """The one shape of every progress line: `[mtml] epoch 3/10 | val/mean_loss 0.41 | ...`
    (training's reports, meta-training's timed lines, a Tune search's ended trials)."""
    return " | ".join([f"{prefix} {what} {done}/{total}", *parts])


def trials_progress(stage: str, trials, ended, total: int | None = None) -> None:
    """One line per ended Tune trial: how far a search's stage is (Tune's own table is off).
    Tune calls back before it marks the ended trial, so that one counts as done here. `total`:
    the trials the stage will have, where Tune makes them as it goes (trials at a time)."""
    states = ["TERMINATED" if t is ended else t.status for t in trials]
    done = sum(s in ("TERMINATED", "ERROR") for s in states)
    say(progress_line(f"{stage} trials", done, max(len(states), total or 0),
                      [f"{states.count('RUNNING')} running", f"{states.count('PENDING')} pending"], prefix="[tune]"))


def say(line: str, console: str | None = None) -> None:
    """Show `line` in the command's terminal: through the console actor `console` (default: the
    one this process's environment names), or printed here when there is none."""
    name = console or os.environ.get(ENV)
    if name:
        try:
            import ray

            if name not in _handles:
                _handles[name] = ray.get_actor(name)
            _handles[name].put.remote(line)
            return
        except (ValueError, ImportError):  # no such actor: this process prints
            pass
    print(line, flush=True)


@contextlib.contextmanager
def relay(name: str, every_s: float = 0.5) -> Iterator[str]:
    """While open, a console actor called `name` whose lines this process prints every
    `every_s` seconds, and once more, all that is left, on the way out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this node: placed elsewhere, a lost node could take every later line with it (seen when
    # an elastic run lost the node it had landed on: the run went on, the terminal fell silent).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = _console_actor().options(name=name, scheduling_strategy=here).remote()
    stop = threading.Event()

    def show() -> None:
        for line in ray.get(actor.take.remote(), timeout=10):
            print(line, flush=True)

    def pump() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a slow or stopping Ray: the next round, or the last
                show()

    thread = threading.Thread(target=pump, name="mtml-console", daemon=True)
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # what Ray can still give back
            show()
        ray.kill(actor)
        _handles.pop(name, None)
