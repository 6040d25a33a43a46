"""Error types and the exit codes the CLI maps them to.

Bad input (a suite, a config, a flag) must be told apart from a crash: scripts that
drive `mtml` rely on exit code 2 meaning "fix your input" and 1 meaning "something broke".
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


class InputError(Exception):
    """A problem with what the user supplied; each entry of `problems` is one line
    that names the file, field or column at fault."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingFailed(Exception):
    """Training stopped for a reason the run can tell in one line (a dead worker, a diverged
    loss), with the checkpoint to continue from: printed without a traceback, exit code 1."""


def validation_lines(where: str, err: "pydantic.ValidationError", blame: dict[str, str] | None = None) -> list[str]:  # noqa: F821
    """One line per pydantic error, naming the file (or object) and the dotted key; a key set
    on the command line (`blame`: key -> '--set key=value') names that flag instead."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        source = next((b for k, b in (blame or {}).items() if key == k or key.startswith(k + ".") or k.startswith(key + ".")), where)
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {e['msg']}")
    return lines
