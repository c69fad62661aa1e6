"""The layout keeps its promises: folders are stages that import only downward, no import cycles (function-level and
TYPE_CHECKING imports included), no module reaches into another package's private modules or names, each layer
imports only the third-party libraries it is about, and no line is longer than the configured 120 characters."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 120

# The rooms of gradindex, lowest first: a module may import its own room or a room of a lower rank, never a room
# of its own rank or above (featurize and store, or methods and search, know nothing of each other).
RANKS = {
    "gradindex.errors": 0,
    "gradindex.version": 0,
    "gradindex.utils": 1,
    "gradindex.task": 2,
    "gradindex.checkpoints": 2,
    "gradindex.training": 3,
    "gradindex.tasks": 3,
    "gradindex.projection": 3,
    "gradindex.featurize": 4,
    "gradindex.store": 4,
    "gradindex.methods": 5,
    "gradindex.search": 5,
    "gradindex.ensemble": 5,
    "gradindex.pipeline": 6,
    "gradindex.apps": 7,
    "gradindex": 8,  # the package's __init__: the public API, re-exported
    "gradindex.cli": 9,
}
# third-party libraries a room must not import (the store knows Zarr, not FAISS; search knows FAISS, not Zarr)
FORBIDDEN = {
    "gradindex.errors": {"torch", "numpy", "faiss", "zarr", "pyarrow", "click"},
    "gradindex.utils": {"torch", "faiss", "zarr", "pyarrow", "click"},
    "gradindex.store": {"faiss", "click"},
    "gradindex.search": {"zarr", "click"},
}
FORBIDDEN_EVERYWHERE_BUT_CLI = {"click"}


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "cli":  # the top-level cli/ folder installs as gradindex.cli
        parts = ["gradindex", "cli", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files() -> dict[str, Path]:
    files = sorted((ROOT / "gradindex").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))
    return {_module_name(path): path for path in files}


MODULES = _library_files()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(path: Path, package: str) -> list[tuple[str, list[str], int]]:
    """Every import in the file, wherever it is: ``(module, names imported from it, line)``; relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The gradindex modules an import statement loads explicitly (``from a import b`` loads a, and a.b if a module)."""
    targets = [module] if module in MODULES else []
    targets += [f"{module}.{name}" for name in names if f"{module}.{name}" in MODULES]
    return targets


def _room(module: str) -> str:
    for room in sorted(RANKS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room of RANKS; give its folder a rank in tests/test_layout.py")


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph[module] = set()
        for target, names, _ in _imports(path, _package_of(module, path)):
            graph[module].update(t for t in _targets(target, names) if t != module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_module_is_in_a_ranked_room():
    for module in MODULES:
        _room(module)


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_rooms_import_only_downward():
    upward = []
    for module, path in MODULES.items():
        room = _room(module)
        for target, names, line in _imports(path, _package_of(module, path)):
            for imported in _targets(target, names):
                other = _room(imported)
                if other != room and RANKS[other] >= RANKS[room]:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {room} (rank {RANKS[room]}) imports {imported}")
    assert not upward, "imports that do not go down:\n" + "\n".join(upward)


def _private_imports(files: dict[str, Path]) -> list[str]:
    """Imports of another package's private modules (``gradindex.x._y``) or names (``from gradindex.x import _y``)."""
    found = []
    for module, path in files.items():
        package = _package_of(module, path)
        for target, names, line in _imports(path, package):
            if not target.startswith("gradindex"):
                continue
            parts = target.split(".")
            # the package that owns the first private part of the path (gradindex.store for gradindex.store._atomic)
            owner = ".".join(parts[: next((i for i, part in enumerate(parts) if part.startswith("_")), len(parts))])
            reaches_in = owner != target and not _within(package, owner)
            # the package of the module the names come from
            source = (
                target if target in MODULES and MODULES[target].name == "__init__.py" else target.rpartition(".")[0]
            )
            private_names = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if reaches_in or (private_names and not _within(package, source)):
                found.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(names) or '*'}")
    return found


def _within(package: str, owner: str) -> bool:
    return package == owner or package.startswith(owner + ".")


def test_no_module_imports_another_packages_private_names():
    found = _private_imports(MODULES)
    assert not found, "imports of another package's private modules or names:\n" + "\n".join(found)


def test_tests_benchmarks_and_examples_use_only_public_names():
    others = {}
    for folder in ("tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".speed-cache" not in path.parts:
                others[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    found = _private_imports(others)
    assert not found, "imports of gradindex's private modules or names:\n" + "\n".join(found)


def test_the_private_import_check_catches_both_kinds(tmp_path):
    (tmp_path / "probe.py").write_text(
        "from gradindex.store._store import open_store\nfrom gradindex.store import _transforms\n"
        "from gradindex.store import open_store as fine\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _private_imports({"probe": tmp_path / "probe.py"})
    finally:
        ROOT = saved
    assert len(found) == 2 and "_store" in found[0] and "_transforms" in found[1]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_each_layer_imports_only_its_own_libraries(room):
    offenders = []
    for module, path in MODULES.items():
        if _room(module) != room:
            continue
        for target, _, line in _imports(path, _package_of(module, path)):
            if target.split(".")[0] in FORBIDDEN[room]:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: import {target}")
    assert not offenders, f"{room} must not import {sorted(FORBIDDEN[room])}:\n" + "\n".join(offenders)


def test_only_the_command_line_imports_click():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in MODULES.items()
        if _room(module) != "gradindex.cli"
        for target, _, line in _imports(path, _package_of(module, path))
        if target.split(".")[0] in FORBIDDEN_EVERYWHERE_BUT_CLI
    ]
    assert not offenders, f"the library never imports click: {offenders}"


def test_no_line_is_longer_than_the_configured_limit():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.toml", "*.yml", "*.cfg"], cwd=ROOT, capture_output=True, text=True
    )
    paths = [ROOT / name for name in tracked.stdout.split()] or sorted(ROOT.rglob("*.py"))
    long_lines = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in paths
        if path.is_file() and ".speed-cache" not in path.parts
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if len(line) > LIMIT
    ]
    assert not long_lines, f"lines over {LIMIT} characters: {long_lines[:20]}"
