"""rlcore's import graph, read from the source (function-level imports included, TYPE_CHECKING blocks not), has no
cycle: a change that adds one fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rlcore"


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        tree = ast.parse((PKG / f"{m}.py").read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "rlcore":
                    edges[m] |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("rlcore."):
                    edges[m].add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rlcore.")}
    return {m: e - {m} for m, e in edges.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest rotation (Johnson would be faster; the graph has ~25 nodes)."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(g[node]):
            if nxt == start:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])

    for s in sorted(g):
        walk(s, s, [s])
    return [list(c) for c in sorted(found)]


def test_the_graph_is_read_from_the_source() -> None:
    g = graph()
    assert "config" in g["controller"] and "batch" in g["rollout"]  # a sanity check that edges are found


def test_rlcore_has_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in found)


def test_the_batch_is_a_leaf() -> None:
    assert graph()["batch"] == set()
