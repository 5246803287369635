"""The folder tree is the architecture: every koff module imports only from its own layer or
the layers below it (function-local imports included), and no two modules import each other,
directly or around a cycle. The layers, lowest first, are listed in LAYERS (docs/architecture.md
says what each holds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "koff"
LAYERS = (
    ("core",),
    ("data",),
    ("model",),
    ("config",),
    ("storage",),
    ("training", "evaluation"),  # siblings: neither imports the other
    ("export",),
    ("serve",),
    ("experiments",),
    ("cli",),
)
"""koff's sub-packages from the lowest layer to the highest. `koff/__init__.py` (the public API)
and `koff/__main__.py` stand above all of them."""
TOP = ("koff", "koff.__main__")
EXCLUDED = ("koff.export.remote",)
"""Copied into exported folders as transformers remote code: they import no koff module."""


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if not name.startswith(EXCLUDED):
            out[name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(koff module imported, line) for every import in the file, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.append((full if full in MODULES else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m == "koff" or m.startswith("koff.")]


def _layer(module: str) -> int | None:
    if module in TOP:
        return len(LAYERS)
    package = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    return None


def _where(path: Path) -> str:
    return str(path.relative_to(SRC.parent)) if path.is_relative_to(SRC.parent) else str(path)


def test_every_module_is_in_a_layer():
    loose = sorted(m for m in MODULES if _layer(m) is None)
    assert not loose, f"modules outside every layer of tests/test_layers.py LAYERS: {loose}"


def test_imports_go_only_downwards():
    bad = []
    for name, path in MODULES.items():
        mine = _layer(name)
        for target, line in _imports(name, path):
            theirs = _layer(target)
            if theirs is None or target in TOP and name not in TOP:
                bad.append(f"{_where(path)}:{line}: {name} imports {target} (the public API "
                           "facade or outside every layer)")
            elif theirs > mine or (theirs == mine and target.split(".")[1] != name.split(".")[1]):
                bad.append(f"{_where(path)}:{line}: {name} ({'/'.join(LAYERS[mine])}) imports "
                           f"{target} ({'/'.join(LAYERS[theirs]) if theirs < len(LAYERS) else 'top'})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {name: {t for t, _ in _imports(name, path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and t != "koff")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad", ["koff.experiments.report", "koff.cli"])
def test_the_check_can_fail(bad, tmp_path, monkeypatch):
    """A core module importing a higher layer is reported (the test is not vacuous)."""
    fake = tmp_path / "koff" / "core" / "leak.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"def f():\n    from {bad} import x\n")
    monkeypatch.setitem(MODULES, "koff.core.leak", fake)
    with pytest.raises(AssertionError, match="koff.core.leak"):
        test_imports_go_only_downwards()
