"""The reference pages of the docs, written from the code itself.

Config keys come from the pydantic schema (defaults and field descriptions), methods, heads,
algorithms, strategies and generators from their registries, and the commands from argparse:
there is no second list to keep in sync. `docs/hooks.py` puts these into the pages at build time.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from pydantic import BaseModel


def _cell(text: Any) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (`SuiteConfig | None` -> SuiteConfig), or None for a value."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
    elif field.is_required():
        return "required"
    else:
        value = field.default
    if value is None:
        return "—"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def config_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf key of a config section, in schema order."""
    rows = []
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None and name != "target":  # transfer.target is a suite, written as its keys
            rows.extend(config_keys(section, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", _default(field), field.description or ""))
    return rows


def config_reference() -> str:
    """One table per config section: key, default, meaning."""
    from distributed_mtml.config import Config

    out = []
    for name, field in Config.model_fields.items():
        section = _section_model(field.annotation)
        out.append(f"### `{name}`\n")
        if section.__doc__:
            out.append(" ".join(section.__doc__.split()) + "\n")
        out.append("| key | default | meaning |\n|---|---|---|")
        out.extend(f"| `{key}` | {default} | {_cell(meaning)} |" for key, default, meaning in config_keys(section, f"{name}."))
        out.append("")
    return "\n".join(out)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def registries_reference() -> str:
    """Every registry's entries: what each is, which options it takes."""
    from distributed_mtml.aggregation import METHODS
    from distributed_mtml.architectures import ARCHITECTURES
    from distributed_mtml.data.generators import GENERATORS
    from distributed_mtml.heads import HEADS
    from distributed_mtml.meta.algorithms import ALGORITHMS
    from distributed_mtml.transfer.strategies import STRATEGIES

    def opts(keys: tuple[str, ...], section: str) -> str:
        return ", ".join(f"`{section}.{k}`" for k in keys) or "—"

    parts = [
        "### Aggregation methods (`aggregation.method`)\n",
        _table(["name", "kind", "options", "what it does"],
               [[f"`{n}`", m.kind, opts(m.params, "aggregation"), m.summary] for n, m in METHODS.items()]),
        "### Heads (`model.heads`)\n",
        _table(["name", "options", "what it does"],
               [[f"`{n}`", opts(h.params, "model"), h.summary] for n, h in HEADS.items()]),
        "### Architectures (`model.architecture`)\n",
        _table(["name", "options", "meta-learning", "what it does"],
               [[f"`{n}`", opts(a.params, "model"), "yes" if a.meta else "no", a.summary]
                for n, a in ARCHITECTURES.items()]),
        "### Meta-learning algorithms (`meta.algorithm`)\n",
        _table(["name", "what it does"], [[f"`{n}`", a.summary] for n, a in ALGORITHMS.items()]),
        "### Transfer strategies (`transfer.strategies`)\n",
        _table(["name", "settings searched", "needs", "what it does"],
               [[f"`{n}`", opts(s.settings, "transfer"), _needs(s), s.summary] for n, s in STRATEGIES.items()]),
        "### Suite generators (`mtml data make`, `suite.generator`)\n",
        _table(["name", "options (default)", "what it makes"],
               [[f"`{n}`", ", ".join(f"`{k}` ({f.default})" for k, f in g.options.model_fields.items()), g.summary]
                for n, g in GENERATORS.items()]),
    ]
    return "\n".join(parts)


def _needs(strategy: Any) -> str:
    needs = [text for flag, text in ((strategy.needs_meta_source, "a meta-learned source"),
                                     (strategy.needs_source_head, "a source head of the target's kind"),
                                     (strategy.maps_features, "nothing of the features (maps them)"))
             if flag]
    return "; ".join(needs) or "the target's features to match the source's"


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and subcommand of `parser`, depth first."""
    out = [(prefix, parser)]
    for action in parser._actions:  # argparse keeps its subparsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.extend(_commands(child, f"{prefix} {name}"))
    return out


def _fixed_width(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=100)


def cli_reference() -> str:
    """Each command's `--help`, as argparse prints it."""
    from distributed_mtml.cli import build_parser

    out = []
    for name, parser in _commands(build_parser(), "mtml"):
        parser.prog = name
        parser.formatter_class = _fixed_width  # the page reads the same whatever terminal built it
        out.append(f"### `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(out)


PAGES = {"config": config_reference, "registries": registries_reference, "cli": cli_reference}
"""Marker name in a docs page (`<!-- reference: NAME -->`) -> what replaces it."""
