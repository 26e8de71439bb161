"""Notebooks: paired with jupytext, committed without outputs, and each runs top to bottom.

The execution tests read the committed reference tables (``results/quick/`` in quick mode, ``results/`` by
default) and write their figures to a temporary directory, so they never write into the checkout; they run
with ``run_missing=False`` so a missing table is a failure, not a silent multi-minute sweep. Each figure
is shown exactly once, no cell warns, and a notebook asked for another model shows that model's table
or says there is none (never the default model's numbers).
"""
import json
import os
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
EXPECTED = {"00_kernels_tour", "01_quantization", "02_sparsity", "03_low_rank", "04_pareto", "05_nonuniform", "06_structured",
            "07_modern_methods"}


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


def _execute(py, tmp_path, **parameters):
    """Run a notebook with papermill; returns the executed notebook (JSON)."""
    import papermill

    out = tmp_path / py.with_suffix(".ipynb").name
    env_interp = os.environ.pop("TRITON_INTERPRET", None)  # the notebook decides for itself
    try:
        papermill.execute_notebook(str(py.with_suffix(".ipynb")), str(out), parameters=parameters,
                                   cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    return json.loads(out.read_text())


def _text(nb) -> str:
    parts = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            parts.append("".join(o.get("text", "")))
            parts.append("".join(o.get("data", {}).get("text/plain", "")))
            parts.append("".join(o.get("data", {}).get("text/html", "")))
    return "\n".join(parts)


def _check_outputs(nb, py, figures_dir):
    saved = {p.stem for p in figures_dir.glob("*.png")}
    assert saved, f"{py.name} saved no figure"
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    # Each saved figure is displayed exactly once (not once by the inline backend and again as the cell value).
    assert len(images) == len(saved), f"{py.name}: {len(images)} images shown for {len(saved)} figures {sorted(saved)}"
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                assert "Warning" not in "".join(o["text"]) and "No artists" not in "".join(o["text"]), \
                    f"{py.name} warned: {''.join(o['text'])[:500]}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_quick_mode(py, tmp_path):
    nb = _execute(py, tmp_path, quick=True, run_missing=False, figures_dir=str(tmp_path / "figures"))
    _check_outputs(nb, py, tmp_path / "figures")


@pytest.mark.parametrize("py", [p for p in NOTEBOOKS if p.stem != "00_kernels_tour"], ids=lambda p: p.stem)
def test_defaults_show_the_full_reference_tables(py, tmp_path):
    """Default parameters: the full committed tables (55 points), not the 9-point quick ones."""
    import pandas as pd
    import papermill

    sweep = {"05_nonuniform": "nonuniform", "06_structured": "structured", "07_modern_methods": "modern"}.get(py.stem)
    if sweep and not (ROOT / "results" / f"sweep_{sweep}.csv").exists():
        # No full reference run of this sweep is committed yet (only results/quick/): the notebook must
        # say so and name the command, not fall back to other numbers. Strict as soon as one is promoted.
        with pytest.raises(papermill.PapermillExecutionError, match=rf"run `python -m experiments run {sweep}"):
            _execute(py, tmp_path, run_missing=False, figures_dir=str(tmp_path / "figures"))
        return
    nb = _execute(py, tmp_path, run_missing=False, figures_dir=str(tmp_path / "figures"))
    _check_outputs(nb, py, tmp_path / "figures")
    text = _text(nb)
    sweep = {"01_quantization": "quant", "02_sparsity": "sparsity", "03_low_rank": "lowrank",
             "05_nonuniform": "nonuniform", "06_structured": "structured", "07_modern_methods": "modern"}.get(py.stem)
    if sweep:
        n = len(pd.read_csv(ROOT / "results" / f"sweep_{sweep}.csv"))
        assert f"{n} points of SmolLM2-135M" in text and str(ROOT / "results" / f"sweep_{sweep}.csv") in text
        assert "dense perplexity 24.22," in text  # the full run's, not the quick run's 23.59
    else:
        assert f"sweeps from {ROOT / 'results'};" in text


def test_another_model_shows_that_model(tmp_path):
    """-p model M reads M's table (here a run directory holding a table of model M), never the default's."""
    import pandas as pd

    model = "/data/models/tiny-llama"
    df = pd.read_csv(ROOT / "results" / "quick" / "sweep_quant.csv")
    df["model"] = model
    df["ppl"] = df["ppl"] * 10  # distinguishable from the default model's numbers
    (tmp_path / "run" / "quick").mkdir(parents=True)
    df.to_csv(tmp_path / "run" / "quick" / "sweep_quant.csv", index=False)
    py = ROOT / "notebooks" / "01_quantization.py"
    nb = _execute(py, tmp_path, quick=True, model=model, results_dir=str(tmp_path / "run"), run_missing=False)
    text = _text(nb)
    assert f"3 points of {model}" in text and "dense perplexity 235.9," in text


def test_another_model_without_results_says_so(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("TKR_RUNS_DIR", str(tmp_path / "runs"))
    py = ROOT / "notebooks" / "01_quantization.py"
    with pytest.raises(papermill.PapermillExecutionError, match=r"no quant results for model '/data/models/other'"):
        _execute(py, tmp_path, quick=True, model="/data/models/other", run_missing=False)
