"""Notebooks: paired with jupytext, committed without outputs, and each runs top to bottom in quick mode.

The execution test reads the committed quick-mode tables (``results/quick/``) and writes its figures to a
temporary directory, so it never writes into the checkout; it runs with ``run_missing=False`` so a missing
table is a failure, not a silent multi-minute sweep.
"""
import json
import os
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
EXPECTED = {"00_kernels_tour", "01_quantization", "02_sparsity", "03_low_rank", "04_pareto"}


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_all_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync_and_without_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {py.relative_to(ROOT)}`"
    assert _cells(jupytext.read(py)) == _cells(jupytext.read(ipynb)), (
        f"{py.name} and {ipynb.name} differ: run `jupytext --sync {py.relative_to(ROOT)}`")
    raw = json.loads(ipynb.read_text())
    dirty = [i for i, c in enumerate(raw["cells"]) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{ipynb.name} has outputs committed in cells {dirty}: clear them before committing"
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in raw["cells"]), \
        f"{ipynb.name} needs a papermill 'parameters' cell"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_quick_mode(py, tmp_path):
    import papermill

    env_interp = os.environ.pop("TRITON_INTERPRET", None)  # the notebook decides for itself
    try:
        papermill.execute_notebook(
            str(py.with_suffix(".ipynb")), str(tmp_path / py.with_suffix(".ipynb").name),
            parameters={"quick": True, "run_missing": False, "figures_dir": str(tmp_path / "figures")},
            cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    assert list((tmp_path / "figures").glob("*.png")), f"{py.name} saved no figure"
