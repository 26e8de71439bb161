"""Each extra is enough for what it enables.

- core (``pip install -e .``): the kernels and modules (``triton_kernels``); kernel files import only
  torch and triton (copyable), and nothing in ``triton_kernels`` reaches up into the harness;
- ``experiments``: the harness and its CLI (``python -m experiments list`` once failed with
  ``No module named 'matplotlib'``);
- ``notebooks``: the notebooks (and JupyterLab, see test_lab.py) on top of the harness.

"Needs" is the transitive closure of a set of requirements over the installed distributions'
metadata. The checks read every import statement (module level and inside functions), and run the
CLI in a subprocess in which importing anything outside the closure raises ModuleNotFoundError, as
it would where only those extras are installed.
"""
import ast
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"triton_kernels", "experiments", "benchmarks"}
# Imports that are optional on purpose, with where their absence is handled.
OPTIONAL = {
    "datasets": "only for --source wikitext2 (online), imported when asked for",
    "papermill": "reproduce's notebook step; reproduce checks for it before it starts",
    "ipykernel": "reproduce's notebook step; reproduce checks for it before it starts",
    "httpx": "models' offline probe of the hub (huggingface_hub brings it); without it, a socket probe",
    "IPython": "plots show a figure inline only inside a notebook; ImportError means no display",
    "gemlite": "gpu_check's side-by-side column, only where importable (a blank column otherwise)",
    "compressed_tensors": "the export extra: experiments/io/export_ct.py raises SetupError naming it when missing",
    "ray": "the ray extra, only for `run --executor ray`: executors.import_ray raises a SetupError naming it",
    "lm_eval": "the lmeval extra, only for `lm-eval`: lm_eval_cli.import_lm_eval raises a SetupError naming it",
    "llama_cpp": "the engines extra, only for `engine`: engine.load_engine raises a SetupError naming it",
}


def _closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of the distributions these requirements pull in, transitively."""
    own = canonicalize_name(PROJECT["name"])
    todo = [Requirement(r) for r in requirements]
    todo += [Requirement(r) for e in extras for r in PROJECT["optional-dependencies"][e]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == own:  # a self-reference: an extra that includes another extra
            todo += [Requirement(r) for e in req.extras for r in PROJECT["optional-dependencies"][e]]
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. the CUDA libraries of a GPU torch build)
        for r in map(Requirement, reqs):
            wanted = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if r.marker is None or any(r.marker.evaluate(env) for env in wanted):
                todo.append(r)
    return seen


def _import_names_of(dists: set[str]) -> tuple[set[str], set[str]]:
    """(top-level import names provided by ``dists``, those provided only by other distributions)."""
    allowed, other = set(), set()
    for top, owners in md.packages_distributions().items():
        owners = {canonicalize_name(o) for o in owners}
        (allowed if owners & dists else other).add(top)
    return allowed, other - allowed


def _imports(paths) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _outside(paths, dists: set[str], optional=()) -> dict[str, set[str]]:
    allowed, _ = _import_names_of(dists)
    ok = set(sys.stdlib_module_names) | OWN | allowed | set(optional) | {"__future__"}
    return {m: f for m, f in _imports(paths).items() if m not in ok}


CORE = _closure(PROJECT["dependencies"])
EXPERIMENTS = _closure(PROJECT["dependencies"], ("experiments",))
NOTEBOOKS = _closure(PROJECT["dependencies"], ("notebooks",))


def test_kernel_files_import_only_torch_and_triton():
    files = [ROOT / "triton_kernels" / f for f in ("dequant_matmul.py", "sparse_matmul.py", "lowrank_linear.py",
                                                  "codebook_matmul.py")]
    bad = {m: f for m, f in _imports(files).items() if m not in set(sys.stdlib_module_names) | {"torch", "triton"}}
    assert not bad, f"kernel files must stay copyable (torch + triton only): {bad}"


def test_core_package_needs_only_core_dependencies():
    files = sorted((ROOT / "triton_kernels").rglob("*.py"))
    assert not _outside(files, CORE), _outside(files, CORE)
    up = {m: f for m, f in _imports(files).items() if m in ("experiments", "benchmarks")}
    assert not up, f"triton_kernels must not import the harness: {up}"


def test_experiments_extra_covers_every_harness_import():
    files = sorted((ROOT / "experiments").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert "matplotlib" in {canonicalize_name(n) for n in EXPERIMENTS}
    bad = _outside(files, EXPERIMENTS, OPTIONAL)
    assert not bad, f"imported by the harness but not in core + the experiments extra: {bad}"


def test_notebooks_extra_covers_the_notebooks():
    files = sorted((ROOT / "notebooks").glob("*.py"))
    assert files
    bad = _outside(files, NOTEBOOKS)
    assert not bad, f"imported by the notebooks but not in core + the notebooks extra: {bad}"
    for pkg in ("jupyterlab", "ipywidgets", "ipykernel", "papermill"):
        assert pkg in NOTEBOOKS, f"the notebooks extra must install {pkg}"


# In the subprocess: importing a module that only distributions outside core + experiments provide
# raises ModuleNotFoundError, as it would where only those are installed.
GUARD = r"""
import json, sys
blocked = set(json.loads(sys.argv[1]))

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in core + the experiments extra)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


def _run_guarded(code: str) -> subprocess.CompletedProcess:
    _, blocked = _import_names_of(EXPERIMENTS)
    blocked -= set(sys.stdlib_module_names) | OWN
    assert "matplotlib" not in blocked and "papermill" in blocked  # the guard guards something
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", GUARD + code, json.dumps(sorted(blocked))],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_runs_with_core_and_the_experiments_extra_only():
    code = r"""
import pkgutil, importlib, experiments
from experiments.__main__ import build_parser, main
build_parser()  # every command's arguments: imports their modules
for m in pkgutil.walk_packages(experiments.__path__, "experiments."):
    importlib.import_module(m.name)
sys.exit(main(["list"]))
"""
    proc = _run_guarded(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quant" in proc.stdout, proc.stdout


def test_reproduce_without_the_notebooks_extra_fails_before_it_starts(tmp_path):
    code = r"""
import experiments.analysis.reproduce
def started(args):
    raise SystemExit("reproduce started without papermill")
experiments.analysis.reproduce.main = started
from experiments.__main__ import main
sys.exit(main(["reproduce", "--quick", "--out-dir", sys.argv[2]]))
"""
    proc = _run_guarded(code.replace("sys.argv[2]", repr(str(tmp_path))))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr.strip()
    assert err.startswith("error:") and "notebooks" in err and "--skip-notebooks" in err, err
    assert not any(tmp_path.iterdir())

