"""The layering docs/architecture.md describes, checked on the source: each folder of ``csi/``
imports only the folders its table row lists (and the shared modules beside them), and no
module of ``csi`` takes part in an import cycle. Every import counts, also those inside
functions: a lazy import that runs up a layer is still a dependency."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSI = REPO / "csi"

#: Modules beside the folders that any layer may use; they import no other ``csi`` module.
SHARED = {"csi.metrics", "csi.sqlite", "csi.limits"}
#: Beside the folders too, but above ``fetch`` (it reads repository settings), and read only
#: by the layers that run the driver.
CONFIG = "csi.config"
CONFIG_READERS = {"fuse", "server", "cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in CSI.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``csi`` modules ``name`` imports: for ``from X import a, b`` the submodules
    ``X.a``/``X.b`` where those are modules, else ``X`` itself. A module's own package is
    left out (importing a sibling runs the package's ``__init__`` first anyway)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer_table() -> dict[str, set[str]]:
    """folder -> the folders it may import, from docs/architecture.md's table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `csi/(\w+)/` \| [^|]+ \| ([^|]+) \|$", text, re.M)
    assert rows, "docs/architecture.md has no layer table"
    allowed: dict[str, set[str]] = {}
    order: list[str] = []
    for folder, deps in rows:
        deps = deps.strip()
        if deps == "everything above":
            allowed[folder] = set(order)
        elif deps == "\u2014":
            allowed[folder] = set()
        else:
            allowed[folder] = {d.strip() for d in deps.split(",")}
            assert allowed[folder] <= set(order), f"{folder} depends on a layer below it"
        order.append(folder)
    return allowed


def _home(module: str) -> str | None:
    """The folder (layer) a module belongs to, or None for a module beside the folders."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (CSI / parts[-1]).is_dir() else None


def test_the_layer_table_matches_the_folders() -> None:
    folders = {p.name for p in CSI.iterdir() if (p / "__init__.py").exists()}
    assert set(_layer_table()) == folders


def _wrong_way(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, deps in sorted(graph.items()):
        home = _home(module)
        for dep in sorted(deps):
            there = _home(dep)
            if module in SHARED:
                ok = False
            elif there is None:
                ok = dep in SHARED or (
                    dep == CONFIG and (home in CONFIG_READERS or module == "csi.demo")
                )
            elif home is None:  # csi.config (reads fetch's settings), csi.demo (runs it all)
                ok = there == "fetch" or there in allowed["fetch"] or module == "csi.demo"
            else:
                ok = there == home or there in allowed[home]
            if not ok:
                wrong.append(f"{module} imports {dep}")
    return wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one
    module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_runs_up_a_layer() -> None:
    assert _wrong_way(_graph(), _layer_table()) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_find_what_they_look_for() -> None:
    # Not vacuous: the graph sees imports made through ``from . import`` and from packages,
    # and the checks flag a cycle and an import up a layer when there is one.
    graph = _graph()
    assert "csi.fetch.worker" in graph["csi.fetch.bulk"]
    assert "csi.store" in graph["csi.fetch.worker"]
    assert "csi.fetch.naming" in graph["csi.fetch.worker"]
    cyclic = {**graph, "csi.fetch.naming": graph["csi.fetch.naming"] | {"csi.fetch.bulk"}}
    assert _cycles(cyclic) == [
        ["csi.fetch.bulk", "csi.fetch.naming", "csi.fetch.worker", "csi.fetch.workertemp"]
    ]
    upward = {**graph, "csi.store.db": graph["csi.store.db"] | {"csi.fetch.errors"}}
    assert _wrong_way(upward, _layer_table()) == ["csi.store.db imports csi.fetch.errors"]
    shared = {**graph, "csi.sqlite": {"csi.store.db"}}
    assert _wrong_way(shared, _layer_table()) == ["csi.sqlite imports csi.store.db"]
