"""Project-level checks: the conda environment and pyproject install the same things; CI runs tests."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    # An extra may include another one of this project ("<name>[experiments]"): not a package to list.
    return {_name(r): r.replace(" ", "") for r in reqs if _name(r) != _name(meta["name"])}


def _environment_pip_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}


def test_environment_yml_matches_pyproject():
    py, env = _pyproject_requirements(), _environment_pip_requirements()
    assert set(py) == set(env), (
        f"only in pyproject: {sorted(set(py) - set(env))}; only in environment.yml: {sorted(set(env) - set(py))}")
    differing = {n: (py[n], env[n]) for n in py if py[n] != env[n]}
    assert not differing, f"version specifiers differ (pyproject, environment.yml): {differing}"


def test_torch_range_admits_the_cpu_build():
    from packaging.specifiers import SpecifierSet
    spec = _pyproject_requirements()["torch"][len("torch"):]
    assert "2.13.0" in SpecifierSet(spec), f"torch requirement {spec!r} must admit torch==2.13.0"


# The Triton each torch wheel on PyPI pins (`pip install --dry-run` / the wheels' metadata, 2026-11).
TORCH_PINS_TRITON = {"2.10.0": "3.6.0", "2.11.0": "3.6.0", "2.12.0": "3.7.0", "2.12.1": "3.7.1",
                     "2.13.0": "3.7.1", "2.14.0": "3.8.0", "2.14.1": "3.8.0"}


def _make_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\??=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile sets no {name}"
    return m.group(1)


def test_triton_range_admits_what_torch_brings():
    # `triton>=3.9,<4` once made `pip install -e .` unresolvable: no torch release pins a 3.9.
    from packaging.specifiers import SpecifierSet
    reqs = _pyproject_requirements()
    torch_spec, triton_spec = SpecifierSet(reqs["torch"][len("torch"):]), SpecifierSet(reqs["triton"][len("triton"):])
    admitted = {t: tr for t, tr in TORCH_PINS_TRITON.items() if t in torch_spec}
    assert admitted, torch_spec
    assert all(tr in triton_spec for tr in admitted.values()), (triton_spec, admitted)
    # The Makefile installs the Triton its torch pins, and tests the ends of the supported range.
    assert _make_var("TRITON") == TORCH_PINS_TRITON[_make_var("TORCH")]
    oldest, newest = _make_var("TRITON_OLDEST"), _make_var("TRITON_NEWEST")
    assert oldest in triton_spec and newest in triton_spec
    assert min(admitted.values(), key=lambda v: tuple(map(int, v.split(".")))) == oldest


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make reproduce" in readme
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"
    assert "make test-triton-range" in readme and re.search(r"^make test-triton-range$", ci, re.M)
