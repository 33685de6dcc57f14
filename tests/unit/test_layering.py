"""The import direction of DESIGN.md holds: policies <- adapters <- gateway; only the CLI reaches loadtest."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def test_policies_import_neither_adapters_nor_gateway() -> None:
    for path in _modules("policies"):
        bad = {m for m in _imports(path) if _top(m) in {"adapters", "gateway", "loadtest"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_policies_do_no_io() -> None:
    io_modules = {"aiohttp", "asyncio", "socket", "httpx", "sqlite3", "asyncpg", "redis", "time"}
    for path in _modules("policies"):
        bad = {m for m in _imports(path) if _top(m) in io_modules}
        assert not bad, f"{path.relative_to(ROOT)} imports I/O or clock modules {bad}"


def test_adapters_reach_only_the_gateway_error_tree() -> None:
    for path in _modules("adapters"):
        bad = {
            m
            for m in _imports(path)
            if (_top(m) == "gateway" and m != "gateway.errors") or _top(m) == "loadtest"
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_cli_imports_loadtest() -> None:
    for path in _modules("gateway"):
        if "cli" in path.relative_to(ROOT / "gateway").parts:
            continue
        bad = {m for m in _imports(path) if _top(m) == "loadtest"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_checker_sees_imports() -> None:
    """Guard against a checker that silently finds nothing."""
    cli = _imports(ROOT / "gateway" / "cli" / "serve.py")
    assert any(_top(m) == "loadtest" for m in cli)
    assert "gateway.errors" in _imports(ROOT / "adapters" / "errors.py")


# -- inside gateway/: no import circles, folders in request-path order --------------------

_PACKAGES = ("gateway", "adapters", "policies", "loadtest")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> our modules it imports (TYPE_CHECKING and function-level imports included)."""
    paths = {_module_name(p): p for pkg in _PACKAGES for p in _modules(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                # `from gateway.state import secretfile` imports the module gateway.state.secretfile
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        targets: set[str] = set()
        for imported in found:
            mod = imported
            while mod and mod not in paths:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                targets.add(mod)
        graph[name] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


# Circles still to break, each named; the test fails when one is gone, so the list stays true.
_KNOWN_CIRCLES: list[list[str]] = []


def test_no_import_circles() -> None:
    assert _circles(_graph()) == _KNOWN_CIRCLES


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


# The request path, top to bottom: a folder imports only folders below it (and the
# top-level modules errors, config, profiles, metrics). process, runtime and wiring compose
# the process's and each config's objects from flow, metering and state (background runs
# the process's pollers over them); http serves them.
_ORDER = ("cli", "http", "compose", "flow", "metering", "state", "base")
_COMPOSE = {"background", "process", "runtime", "wiring"}
# What a request is, whichever server reads it: flow and compose may read these from http/.
_REQUEST_SEAM = {
    "gateway.http.inbound",
    "gateway.http.auth",
    "gateway.http.client_headers",
    "gateway.http.exchange",
}
# Edges against the order that are still there, with why; each one is debt. None is left
# (issue 15 removed the last: the meter moved into flow/, the aiohttp handler into http/).
_KNOWN_BACK_EDGES: set[tuple[str, str]] = set()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in _ORDER:
        return parts[1]
    if len(parts) > 1 and parts[1] in _COMPOSE:
        return "compose"
    return "base"


def _back_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    rank = {layer: i for i, layer in enumerate(_ORDER)}
    out: set[tuple[str, str]] = set()
    for module, targets in graph.items():
        if not module.startswith("gateway."):
            continue
        for target in targets:
            if not target.startswith("gateway.") or _layer(target) == _layer(module):
                continue
            if _layer(module) in {"compose", "flow"} and target in _REQUEST_SEAM:
                continue
            if rank[_layer(target)] < rank[_layer(module)]:
                out.add((module, target))
    return out


def test_gateway_folders_import_downwards() -> None:
    assert _back_edges(_graph()) == _KNOWN_BACK_EDGES


def test_the_folder_order_sees_a_back_edge() -> None:
    graph = {
        "gateway.state.live": {"gateway.http.app", "gateway.errors"},
        "gateway.flow.proxy": {"gateway.http.exchange", "gateway.http.app"},
    }
    assert _back_edges(graph) == {
        ("gateway.state.live", "gateway.http.app"),
        ("gateway.flow.proxy", "gateway.http.app"),
    }
