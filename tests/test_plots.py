"""The figure functions on the committed reference tables: no warning (e.g. matplotlib's "No artists with
labels found to put in legend", which it logs rather than warns) and titles that say what they show."""
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from experiments import plots  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_figures_from_the_reference_tables_draw_without_warnings(quick, caplog):
    tables = {n: plots.sweep_table(n, quick=quick, root=REPO / "results") for n in plots.SWEEPS}
    lat = plots.measurement_table(plots.results_dir(quick, REPO / "results") / "latency_cpu.csv")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        figs = [plots.quant_figure(tables["quant"]), plots.sparsity_figure(tables["sparsity"]),
                plots.lowrank_figure(tables["lowrank"]), plots.pareto_figure(tables, lat), plots.latency_figure(lat),
                plots.roofline_figure(plots.roofline_table(quick, REPO / "results"))]
        for f in figs:
            f.canvas.draw()
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    device = tables["quant"]["device"].iloc[0]
    assert device in figs[0].axes[0].get_title() and device in figs[1]._suptitle.get_text()
    assert device in figs[3].axes[1].get_title()  # the latency half says which machine measured it
    for f in figs:
        plots.plt.close(f)
