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


def test_nonuniform_figures_draw_without_warnings(recwarn):
    """The nonuniform sweep's figures from a small synthetic table (the reference table is promoted
    separately), and the levels histogram from a weight row."""
    import pandas as pd
    import torch

    rows = [("dense", -1, "", 16.0, 23.6), ("rtn", -1, "", 3.05, 316.0), ("gptq", -1, "", 3.05, 60.0),
            ("squeezellm", -1, False, 3.19, 40.9), ("squeezellm", -1, True, 3.19, 35.0),
            ("nf", 64, False, 4.25, 28.9), ("rtn", 64, "", 4.5, 28.5), ("nf", 64, True, 4.25, 28.0)]
    df = pd.DataFrame([{"method": m, "group_size": g, "gptq": gp, "bits_per_weight": b, "ppl": p,
                        "aliases_source_grid": False, "model": "m", "evaluation_text": "t", "eval_tokens": 2048,
                        "device": "cpu"} for m, g, gp, b, p in rows])
    series = plots.nonuniform_series(df).tolist()
    assert series == ["dense", "rtn pc", "gptq pc", "squeezellm pc", "squeezellm+gptq pc", "nf g64", "rtn g64",
                      "nf+gptq g64"]
    fig = plots.nonuniform_figure(df)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "RTN pc (uniform)" in labels and "squeezellm+gptq pc" in labels and len(fig.axes[0].lines) == 8
    plots.show(fig)
    w = torch.randn(1, 300)
    fig = plots.levels_figure(w, {"uniform": torch.linspace(-2, 2, 8), "learned": torch.randn(8)}, title="t")
    assert len(fig.axes[0].collections) == 2
    plots.show(fig)
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
