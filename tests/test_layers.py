"""The harness's import layers: every module imports only from below its own, with no cycle and no private
name taken from another module (issue 22).

Two independent checks:

- ``lint-imports`` keeps every contract in pyproject.toml (``[tool.importlinter]``): the layers of
  ``experiments`` (core < lm < methods < run < measure < benchmarks < analysis, io < __main__), the layers
  inside ``methods``, ``run`` and ``measure``, and ``triton_kernels`` importing nothing of the harness.
- A walk over the syntax trees of ``experiments/`` and ``benchmarks/`` that counts every import statement
  (module level, inside functions, under ``if TYPE_CHECKING:``) finds no import cycle, and no
  ``from x import _name`` / ``x._name`` reaching into another module of these packages.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The packages whose modules the syntax checks cover (and whose names they protect).
PACKAGES = ("experiments", "benchmarks", "triton_kernels")


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is a package __init__)}`` of every module in PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of MODULES that ``name`` (a module or a name inside one) belongs to: its longest prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import statement anywhere in ``module``."""
    path, is_pkg = MODULES[module]
    return _imports_in(path.read_text(), module if is_pkg else module.rpartition(".")[0], str(path))


def _imports_in(source_text: str, package: str, filename: str = "<src>") -> list[tuple[str, str | None, int]]:
    """:func:`_imports` of a module's text; ``package``: the package relative imports start from."""
    out = []
    for node in ast.walk(ast.parse(source_text, filename)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            out += [(source, a.name, node.lineno) for a in node.names]
    return out


def _edges() -> dict[str, dict[str, int]]:
    """``{module: {module it imports: line}}`` within MODULES (a module importing its own names excluded)."""
    edges: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for m in MODULES:
        for source, name, line in _imports(m):
            target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else _owner(source)
            if target and target != m:
                edges[m].setdefault(target, line)
    return edges


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_lint_imports_keeps_every_contract():
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is not installed: it is in the dev extra (pip install -e '.[dev]')")
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout, r.stdout[-6000:]


def test_no_import_cycle_counting_every_import_statement():
    edges = _edges()
    assert len(MODULES) > 40 and edges["experiments.methods.compress"], "the walk found the modules and imports"
    cycles = _cycles(edges)
    detail = "\n".join(
        f"cycle of {len(c)} modules: " + "; ".join(f"{a} -> {b} (line {edges[a][b]})" for a in c for b in edges[a]
                                                   if b in c)
        for c in cycles)
    assert not cycles, detail


def test_the_walk_sees_function_local_and_type_checking_imports():
    """The walk is not limited to module-level statements: the old flat package's cycles hid in the others."""
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from experiments.run.sweep import run_sweeps\n"
           "def f():\n    from .results import read_rows\n    import experiments.lm.models as m\n")
    got = {(source, name) for source, name, _ in _imports_in(src, "experiments.core")}
    assert {("experiments.run.sweep", "run_sweeps"), ("experiments.core.results", "read_rows"),
            ("experiments.lm.models", None)} <= got
    assert _cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c"]]


def test_no_private_name_is_used_outside_its_module():
    bad = []
    for m, (path, _) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> module of MODULES it refers to
        for source, name, line in _imports(m):
            if name is None:
                continue
            if f"{source}.{name}" in MODULES:  # `from package import module`
                continue
            owner = _owner(source)
            if owner and owner != m and _is_private(name):
                bad.append(f"{path.relative_to(ROOT)}:{line}: from {source} import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in MODULES:
                        bound[a.asname] = a.name
                    elif not a.asname:
                        bound[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain, v = [], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if not isinstance(v, ast.Name) or v.id not in bound:
                continue
            target = ".".join([bound[v.id], *reversed(chain)])
            if target in MODULES and target != m:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}.{node.attr}")
    assert not bad, "private names used outside their module (make them public in the module that owns them):\n" \
        + "\n".join(bad)


def _private_module_of(dotted: str) -> str | None:
    """The leading part of ``dotted`` up to its first private component (``a._b.c`` -> ``a._b``), or None."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[:i + 1])
    return None


def test_no_private_module_is_imported_from_outside_its_package():
    """``triton_kernels.nn._backend`` is for ``triton_kernels.nn``'s modules; others use the public names the
    package exports (``triton_kernels.nn.autotune``)."""
    bad = []
    for m, (path, _) in MODULES.items():
        for source, name, line in _imports(m):
            for dotted in (source, f"{source}.{name}" if name else None):
                private = dotted and _private_module_of(dotted)
                parent = private.rsplit(".", 1)[0] if private else ""
                if private and private in MODULES and m != parent and not m.startswith(parent + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports {private}")
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(sorted(set(bad)))


def test_the_layer_packages_are_installed():
    """Package discovery (pyproject ``[tool.setuptools.packages.find]``) must ship every subpackage."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(setuptools.find_packages(str(ROOT), include=find["include"]))
    packages = {m for m, (_, is_pkg) in MODULES.items() if is_pkg}
    assert packages <= found, sorted(packages - found)
