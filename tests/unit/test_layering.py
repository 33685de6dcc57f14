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
