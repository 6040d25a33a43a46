"""The package's module map: lines per module, the imports between its parts, and what breaks the
layering (an import circle; `data/` importing `runtime/`). Reads the source with `ast`: imports
inside functions count, imports only for type checking (`if TYPE_CHECKING:`) do not.

    python jobs/module_map.py            # the map
    python jobs/module_map.py --check    # exit 1 naming each circle or upward import
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict

PACKAGE = "distributed_mtml"
FORBIDDEN = [("distributed_mtml.data", "distributed_mtml.runtime")]  # (importer's part, what it may not import)


def modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package under `root`."""
    out = {}
    for directory, _, names in os.walk(os.path.join(root, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or in a function)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in mods and t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} imports {b}" for a, bs in sorted(edges.items()) for b in sorted(bs)
            for low, high in FORBIDDEN if a.startswith(low) and b.startswith(high)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on an import circle or a forbidden import")
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    mods = modules(args.root)
    edges = imports(mods)
    problems = [f"import circle: {' <-> '.join(c)}" for c in circles(edges)] + upward(edges)
    if not args.check:
        for name, path in sorted(mods.items()):
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            inside = sorted(b.removeprefix(PACKAGE + ".") for b in edges.get(name, ()))
            print(f"{lines:5d}  {name.removeprefix(PACKAGE + '.')}  -> {', '.join(inside) or '-'}")
        print(f"{len(mods)} modules, {sum(len(v) for v in edges.values())} imports between them")
    print("\n".join(problems) or "no import circle, no forbidden import")
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
