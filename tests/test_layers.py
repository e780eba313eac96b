"""
Tests for the layering of C{portal/} (docs/architecture.md): no module imports a package above its
own, no package imports a sibling it must not know, and no modules import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import portal

#: What each package of C{portal/} may import, besides itself and the root package C{portal}.
ALLOWED: dict[str, frozenset[str]] = {
    "wire": frozenset(),
    "trust": frozenset({"wire"}),
    "forwarding": frozenset({"wire"}),
    "registry": frozenset({"wire", "trust", "forwarding"}),
    "gateway": frozenset({"wire", "trust", "forwarding"}),
    "relay": frozenset({"wire", "trust", "forwarding", "registry"}),
    "tunnel": frozenset({"wire", "trust", "forwarding", "registry", "gateway"}),
    "cli": frozenset(
        {"wire", "trust", "forwarding", "registry", "gateway", "relay", "tunnel", "cli"}
    ),
    "tap": frozenset(
        {"wire", "trust", "forwarding", "registry", "gateway", "relay", "tunnel", "cli"}
    ),
}

#: Modules directly in C{portal/}: the version, and C{python -m portal}.
TOP_LEVEL = frozenset({"__init__", "__main__"})


def importedModules(source: str, module: str) -> set[str]:
    """
    Every C{portal} module a source file imports, wherever the import stands (module level,
    functions, C{TYPE_CHECKING} blocks).

    @param source: The module's source.
    @param module: The module's dotted name, for relative imports.
    @return: Dotted names of the imported modules (or of the packages imported from).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            # "from portal.forwarding import kernelsplice" imports a module
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "portal" or name.startswith("portal.")}


def packageOf(name: str) -> str | None:
    """
    @return: The layer package of a dotted C{portal} module name, or L{None} for the root package.
    """
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def modules() -> list[tuple[str, Path]]:
    """
    @return: Every module of C{portal/}, as (dotted name, path).
    """
    root = Path(portal.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        found.append((".".join(relative.parts), path))
    return found


def violations() -> list[str]:
    """
    @return: One line per import that runs upward or sideways across the layers.
    """
    problems = []
    for name, path in modules():
        own = packageOf(name)
        if own is None:
            if name.split(".")[-1] not in TOP_LEVEL:
                problems.append(
                    f"{name}: modules belong in a layer package, not directly in portal/"
                )
            continue
        for imported in sorted(importedModules(path.read_text(), name)):
            target = packageOf(imported)
            if target is None or target == own:
                continue
            if target not in ALLOWED[own]:
                problems.append(f"{name} imports {imported}: {own} may not import {target}")
    return problems


def importGraph() -> dict[str, set[str]]:
    """
    @return: For every module of C{portal/} (a package by its own name, not C{__init__}), the other
        modules of C{portal/} it imports, wherever the import stands.
    """
    found = modules()
    names = {name.removesuffix(".__init__") for name, _ in found}
    graph: dict[str, set[str]] = {}
    for name, path in found:
        own = name.removesuffix(".__init__")
        imported = importedModules(path.read_text(), name)
        graph[own] = {m for m in imported if m in names and m != own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    The import circles of a graph: its strongly connected components of more than one module
    (Tarjan's algorithm, iterative).

    @param graph: Imports by module.
    @return: Each circle's modules, sorted; the circles sorted by their first module.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    onStack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        onStack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                child = pending.pop()
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    onStack.add(child)
                    work.append((child, sorted(graph.get(child, ()))))
                elif child in onStack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    onStack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


class LayerTests(SynchronousTestCase):
    """
    The packages of C{portal/} stand in layers.
    """

    def test_noUpwardImports(self) -> None:
        """
        No module imports a package its layer may not use.
        """
        self.assertEqual(violations(), [])

    def test_everyPackageHasALayer(self) -> None:
        """
        Every package directly under C{portal/} is one of the known layers, so a new package must
        be placed in the layering on purpose.
        """
        root = Path(portal.__file__).parent
        packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
        self.assertEqual(packages, set(ALLOWED))

    def test_detectsUpwardImport(self) -> None:
        """
        The import scan sees imports in functions and C{TYPE_CHECKING} blocks, and a relative one.
        """
        source = (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from portal.tunnel.service import TunnelService\n"
            "def f():\n"
            "    import portal.cli.main\n"
            "from ..relay import leases\n"
        )
        found = importedModules(source, "portal.wire.example")
        self.assertIn("portal.tunnel.service", found)
        self.assertIn("portal.cli.main", found)
        self.assertIn("portal.relay.leases", found)
        self.assertEqual(packageOf("portal.tunnel.service"), "tunnel")
        self.assertIsNone(packageOf("portal"))

    def test_noImportCircles(self) -> None:
        """
        No modules of C{portal/} import each other in a circle, counting imports in functions and
        C{TYPE_CHECKING} blocks: where a lower module must call a higher one, it holds an interface.
        """
        self.assertEqual(cycles(importGraph()), [])

    def test_detectsCircles(self) -> None:
        """
        The circle check finds a direct circle and a longer one, and leaves a chain alone.
        """
        graph = {
            "a": {"b"},
            "b": {"a"},
            "c": {"d"},
            "d": {"e"},
            "e": {"c", "f"},
            "f": set(),
        }
        self.assertEqual(cycles(graph), [["a", "b"], ["c", "d", "e"]])
        self.assertEqual(cycles({"x": {"y"}, "y": {"z"}, "z": set()}), [])

    def test_graphSeesModuleImports(self) -> None:
        """
        The import graph has an edge for a module imported by name inside a package, as the relay's
        router imports its interfaces.
        """
        graph = importGraph()
        self.assertIn("portal.relay.interfaces", graph["portal.relay.router"])
        self.assertNotIn("portal.relay.router", graph["portal.relay.interfaces"])
