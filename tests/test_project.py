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


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make reproduce" in readme
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"
