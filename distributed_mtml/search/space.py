"""The `search.space` of a training search: config keys, each with a Tune domain written in YAML.

    search:
      space:
        aggregation.method: {choice: [mean, pcgrad, mgda]}
        training.lr: {loguniform: [1e-4, 1e-2]}

Each key is a config key as `--set` names it; each domain is one of `DOMAINS`. Everything is
checked before Ray starts: the key must exist, and the config must be valid at every value the
domain can take (each choice, both ends of a range), so that no trial fails on its config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

from distributed_mtml.config import Config, validate_config
from distributed_mtml.errors import InputError


@dataclass(frozen=True)
class Domain:
    """A kind of domain: how Tune samples it, and the values that stand for all of it in the checks."""

    summary: str
    tune: Callable[[list], Any]  # the domain's arguments -> Tune's domain
    ends: Callable[[list], list]  # the values the config is checked at
    check: Callable[[list], str | None]  # what is wrong with the arguments, as a phrase; None: nothing


def _values(args: list) -> str | None:
    return None if args else "needs a non-empty list of values"


def _range(args: list, positive: bool = False, integers: bool = False) -> str | None:
    kind = int if integers else (int, float)
    if len(args) != 2 or not all(isinstance(a, kind) and not isinstance(a, bool) for a in args):
        return f"needs [low, high], two {'integers' if integers else 'numbers'}"
    if not args[0] < args[1]:
        return "needs low < high"
    if positive and args[0] <= 0:
        return "needs low > 0 (a log scale)"
    return None


def _tune():
    import ray.tune

    return ray.tune


DOMAINS: dict[str, Domain] = {
    "choice": Domain("one of the values, drawn at random", lambda a: _tune().choice(a), list, _values),
    "grid": Domain("every value, each with tune.num_samples draws of the rest", lambda a: _tune().grid_search(a), list,
                   _values),
    "uniform": Domain("a float between low and high", lambda a: _tune().uniform(*a), list, _range),
    "loguniform": Domain("a float between low and high on a log scale", lambda a: _tune().loguniform(*a), list,
                         lambda a: _range(a, positive=True)),
    "randint": Domain("an integer from low up to high, high left out", lambda a: _tune().randint(*a),
                      lambda a: [a[0], a[1] - 1], lambda a: _range(a, integers=True)),
}


def parse(config: Config, where: str) -> dict[str, tuple[str, list]]:
    """`search.space` as key -> (domain kind, its arguments), every key and value checked against
    the config (`where`: the config file, named in each error)."""
    assert config.search is not None
    base = base_of(config)
    space: dict[str, tuple[str, list]] = {}
    for key, written in config.search.space.items():
        name = f"{where}: search.space.{key}"
        if not isinstance(written, dict) or len(written) != 1:
            raise InputError(f"{name}: expected one domain such as {{choice: [a, b]}} (kinds: {', '.join(DOMAINS)})")
        (kind, args), = written.items()
        if kind not in DOMAINS:
            raise InputError(f"{name}: unknown domain '{kind}' (kinds: {', '.join(DOMAINS)})")
        args = args if isinstance(args, list) else [args]
        problem = DOMAINS[kind].check(args)
        if problem:
            raise InputError(f"{name}: {kind} {problem}")
        if key.split(".")[0] in ("search", "tune", "tracking"):
            raise InputError(f"{name}: the search's own settings and tracking cannot be searched")
        _check_key(base, key, name)
        for value in DOMAINS[kind].ends(args):
            try:
                trial_config(base, {key: value})
            except InputError as e:
                raise InputError(f"{name}: the value {value!r} makes the config invalid: {_reason(e)}") from None
        space[key] = (kind, args)
    _check_together(base, space, where)
    return space


COMBINATIONS_CHECKED = 256  # up to this many, every combination of the keys' checked values is a valid config


def _check_together(base: dict, space: dict[str, tuple[str, list]], where: str) -> None:
    """Keys that depend on each other (an architecture and its options): each combination of
    the values checked one key at a time, where there are few enough to try."""
    import itertools

    ends = {key: DOMAINS[kind].ends(args) for key, (kind, args) in space.items()}
    if len(space) < 2 or math.prod(len(v) for v in ends.values()) > COMBINATIONS_CHECKED:
        return
    for values in itertools.product(*ends.values()):
        together = dict(zip(ends, values))
        try:
            trial_config(base, together)
        except InputError as e:
            raise InputError(f"{where}: search.space: the setting {setting(together)} makes the config invalid: "
                             f"{_reason(e)}") from None


def _reason(error: InputError) -> str:
    text = str(error)
    return text.split(": ", 1)[1] if ": " in text else text


def _check_key(base: dict, key: str, name: str) -> None:
    """The key names a field of the config (a section's key, not a section)."""
    from pydantic import BaseModel

    model: Any = Config
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            raise InputError(f"{name}: no such config key")
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is not None and key != "suite.options":
        raise InputError(f"{name}: a section, not a key (search one of its keys, e.g. {key}.<key>)")


def tune_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Tune's param space: each key's domain."""
    return {key: DOMAINS[kind].tune(args) for key, (kind, args) in space.items()}


def base_of(config: Config) -> dict:
    """The config as the user wrote it (keys left at their defaults stay unset, so that a
    searched choice such as another architecture is not met by the last one's options),
    without its search."""
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw.pop("search", None)
    return raw


def trial_config(base: dict, values: dict[str, Any]) -> Config:
    """The config of one trial: `base` with each dotted key set to its value."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        node = raw
        *sections, last = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_config(raw, where="search")


def setting(values: dict[str, Any]) -> str:
    """A trial's setting as one short line: `training.lr=0.0031 aggregation.method=pcgrad`."""
    def shown(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)

    return " ".join(f"{k}={shown(v)}" for k, v in values.items())
