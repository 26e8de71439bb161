"""Imports inside ``triton_kernels/`` point one way and use only public names.

Read from the source (every ``import``, module-level or inside a function): no import cycle among the
package's modules, and no private name (``_x``) of one module used by another, whether imported
(``from m import _x``) or reached through a module (``m._x``). A private submodule may be imported
from inside its own package (``from triton_kernels.nn import _ops`` in ``triton_kernels/nn/``).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "triton_kernels"

# Private names of the kernel files that other modules use: none (the nn modules' shared input checks
# are public names of the kernel files).
KNOWN_PRIVATE_USES: set = set()


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _scan(modules: dict[str, Path]):
    """(import edges {module: {module}}, private uses [(importer, module, name)]) of every module."""
    edges: dict[str, set] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases = {}  # local name -> module of this package it is bound to
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = max((m for m in modules if a.name == m or a.name.startswith(m + ".")), key=len,
                                 default=None)
                    if target:
                        edges[name].add(target)
                        if a.asname:
                            aliases[a.asname] = target
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                                    ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:  # a submodule
                        edges[name].add(sub)
                        aliases[a.asname or a.name] = sub
                        own_package = sub.rpartition(".")[0] == package
                        if _is_private(a.name) and not own_package:
                            private.append((name, base, a.name))
                    elif base in modules:
                        edges[name].add(base)
                        if _is_private(a.name):
                            private.append((name, base, a.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)
                    and f"{aliases[node.value.id]}.{node.attr}" not in modules):
                private.append((name, aliases[node.value.id], node.attr))
        edges[name].discard(name)
    return edges, private


def _cycles(edges: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_triton_kernels():
    edges, _ = _scan(_modules(PACKAGE))
    assert "triton_kernels.compile_cases" in edges["triton_kernels.compile_check"]  # the scan sees imports
    assert _cycles(edges) == []


def test_no_private_name_crosses_modules():
    _, private = _scan(_modules(PACKAGE))
    new = sorted(set(private) - KNOWN_PRIVATE_USES)
    assert not new, "private names used outside their module (make them public in the lower module): " + \
        ", ".join(f"{imp} uses {mod}.{n}" for imp, mod, n in new)


def test_the_scan_finds_cycles_and_private_names(tmp_path):
    """The checks above can fail: a two-module cycle through a function-local import, and m._x."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n    return a._hidden\n")
    edges, private = _scan(_modules(pkg))
    assert _cycles(edges) == [["pkg.a", "pkg.b"]]
    assert private == [("pkg.b", "pkg.a", "_hidden")]
