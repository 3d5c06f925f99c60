"""The package layout is the data path (README, Layout): each package imports only from those below it,
and the modules of a package in WITHIN only from those listed before them.

Read from the source with `ast`, so it holds for imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "djinn"

# Lowest first. A module may import from its own layer and those before it.
LAYERS = [
    ("djinn.errors", "djinn.status", "djinn.paths", "djinn.periodic", "djinn.timers", "djinn.config", "djinn.crypto"),
    ("djinn.manifest", "djinn.plan"),
    ("djinn.drivers",),
    ("djinn.runner",),
    ("djinn.observe",),
    ("djinn.db",),
    ("djinn.notify",),
    ("djinn.worker",),
    ("djinn.tasks",),
    ("djinn.cli",),
]
# Packages whose own modules are layered too, lowest first; the package's __init__ sits on top of them all.
WITHIN = {
    "djinn.drivers.ssh": ("connect", "files", "session"),
}
# `import djinn` / `from djinn import __version__`: the package itself, whose Celery app is made lazily.
PACKAGE = "djinn"


def layer_of(module: str) -> int | None:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE:  # from djinn import a, b: the submodules, when they are ones
                found += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


SOURCES = sorted(p for p in ROOT.rglob("*.py") if "migrations" not in p.parts or p.name == "env.py")


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in SOURCES if module_name(p) != PACKAGE and layer_of(module_name(p)) is None]
    assert missing == [], "modules outside every layer of tests/test_layout.py: " + ", ".join(missing)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_only_from_layers_below(path: Path):
    module = module_name(path)
    own = layer_of(module)
    if own is None:  # the package's __init__: the lazy Celery app
        return
    upward = []
    for line, name in imported(ast.parse(path.read_text(), str(path))):
        if name in (PACKAGE, f"{PACKAGE}.__version__"):
            continue
        target = layer_of(name)
        if target is None or target > own:
            upward.append(f"{path.relative_to(ROOT.parent)}:{line}: {name}")
    assert upward == [], f"{module} imports from above its layer:\n" + "\n".join(upward)


def _within(package: str) -> list[str]:
    return [f"{package}.{name}" for name in WITHIN[package]] + [package]


@pytest.mark.parametrize("path", [p for p in SOURCES if module_name(p).rpartition(".")[0] in WITHIN or module_name(p) in WITHIN],
                         ids=lambda p: module_name(p))
def test_layered_package_imports_only_its_modules_below(path: Path):
    module = module_name(path)
    package = module if module in WITHIN else module.rpartition(".")[0]
    order = _within(package)
    assert module in order, f"{module} is not listed in WITHIN[{package!r}] of tests/test_layout.py"
    own = order.index(module)
    upward = [
        f"{path.relative_to(ROOT.parent)}:{line}: {name}"
        for line, name in imported(ast.parse(path.read_text(), str(path)))
        if (name == package or name.startswith(package + ".")) and (name not in order or order.index(name) >= own)
    ]
    assert upward == [], f"{module} imports from its own layer or above it in {package}:\n" + "\n".join(upward)


def _local_imports(tree: ast.AST) -> list[int]:
    """Lines of the imports inside functions."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in ast.walk(node):
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    lines.append(stmt.lineno)
    return sorted(set(lines))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_inside_functions_say_why(path: Path):
    """An import inside a function hides a dependency: allowed where a comment says why
    (import cost, an optional library, the lazy Celery app), next to it or, for a module
    whose commands all do it, once at the top as `# Function-local imports: ...`."""
    text = path.read_text()
    if "\n# Function-local imports:" in text:
        return
    lines = text.splitlines()
    unexplained = []
    for line in _local_imports(ast.parse(text)):
        start = line - 1
        while start > 0 and lines[start - 1].strip().startswith(("import ", "from ")):
            start -= 1  # the comment may stand above the whole run of imports
        window = lines[max(0, start - 3): line]
        if not any("#" in candidate for candidate in window):
            unexplained.append(f"{path.relative_to(ROOT.parent)}:{line}: {lines[line - 1].strip()}")
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)
