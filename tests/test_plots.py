"""The figure functions on the committed reference tables: no warning (e.g. matplotlib's "No artists with
labels found to put in legend", which it logs rather than warns) and titles that say what they show."""
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from experiments.analysis import plots  # noqa: E402
from experiments.analysis.claims import claims_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_figures_from_the_reference_tables_draw_without_warnings(quick, caplog):
    tables = {n: plots.sweep_table(n, quick=quick, root=REPO / "results") for n in plots.SWEEPS}
    lat = plots.measurement_table(plots.results_dir(quick, REPO / "results") / "latency_cpu.csv")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        figs = [plots.quant_figure(tables["quant"]), plots.sparsity_figure(tables["sparsity"]),
                plots.lowrank_figure(tables["lowrank"]), plots.pareto_figure(tables, lat), plots.latency_figure(lat),
                plots.roofline_figure(plots.roofline_table(quick, REPO / "results")),
                plots.claims_figure(claims_table(quick, REPO / "results"))]
        for f in figs:
            f.canvas.draw()
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    device = tables["quant"]["device"].iloc[0]
    assert device in figs[0].axes[0].get_title() and device in figs[1]._suptitle.get_text()
    assert device in figs[3].axes[1].get_title()  # the latency half says which machine measured it
    for f in figs:
        plots.plt.close(f)
    decode = plots.measurement_table(plots.results_dir(quick, REPO / "results") / "decode_cpu.csv")
    fig = plots.pareto_figure(tables, lat, decode=decode)  # the speed half from measured decode speedups
    assert "decode speed" in fig.axes[1].get_title() and decode["device"].iloc[0] in fig.axes[1].get_title()
    assert any(len(c.get_offsets()) for c in fig.axes[1].collections)
    plots.plt.close(fig)


def test_nonuniform_figures_draw_without_warnings(recwarn):
    """The nonuniform sweep's figures from a small synthetic table (the reference table is promoted
    separately), and the levels histogram from a weight row."""
    import pandas as pd
    import torch

    rows = [("dense", -1, "", "", "", 16.0, 23.6), ("rtn", -1, "", "", "", 3.05, 316.0),
            ("gptq", -1, "", "", "", 3.05, 60.0),
            ("squeezellm", -1, False, False, "fisher", 3.19, 40.9), ("squeezellm", -1, True, False, "fisher", 3.19, 35.0),
            ("squeezellm", -1, False, False, "diag_h", 3.19, 43.0), ("squeezellm", -1, False, True, "fisher", 3.19, 41.0),
            ("kmeans", 128, False, True, "", 3.32, 80.0), ("kmeans", 128, False, False, "", 3.32, 1351.0),
            ("nf", 64, False, "", "", 4.25, 28.9), ("rtn", 64, "", "", "", 4.5, 28.5), ("nf", 64, True, "", "", 4.25, 28.0)]
    df = pd.DataFrame([{"method": m, "group_size": g, "gptq": gp, "zero_level": z, "sensitivity": sens,
                        "bits_per_weight": b, "ppl": p, "aliases_source_grid": False, "model": "m",
                        "evaluation_text": "t", "eval_tokens": 2048, "device": "cpu"}
                       for m, g, gp, z, sens, b, p in rows])
    series = plots.nonuniform_series(df).tolist()
    assert series == ["dense", "rtn pc", "gptq pc", "squeezellm pc", "squeezellm+gptq pc", "squeezellm-diagh pc",
                      "squeezellm-zero pc", "kmeans g128", "kmeans-nozero g128", "nf g64", "rtn g64", "nf+gptq g64"]
    # A table written before the zero_level / sensitivity columns existed keeps its old series names.
    assert plots.nonuniform_series(df.drop(columns=["zero_level", "sensitivity"])).tolist()[3:9] == [
        "squeezellm pc", "squeezellm+gptq pc", "squeezellm pc", "squeezellm pc", "kmeans g128", "kmeans g128"]
    fig = plots.nonuniform_figure(df)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "RTN pc (uniform)" in labels and "squeezellm+gptq pc" in labels and "kmeans-nozero g128" in labels
    assert len(fig.axes[0].lines) == 12
    plots.show(fig)
    w = torch.randn(1, 300)
    fig = plots.levels_figure(w, {"uniform": torch.linspace(-2, 2, 8), "learned": torch.randn(8)}, title="t")
    assert len(fig.axes[0].collections) == 2
    plots.show(fig)
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]


def test_families_figure_joins_each_format_to_its_measured_decode_speed(caplog):
    """Every family of the quick reference tables on one chart; uniform quantization takes the decode
    table's bf16 speedup of its storage format, structured points their own; quick and full tables are
    never mixed."""
    import pandas as pd

    root = REPO / "results"
    names = ("quant", "nonuniform", "sparsity", "lowrank", "combo", "structured")
    tables = {n: plots.sweep_table(n, quick=True, root=root) for n in names}
    decode = pd.read_csv(root / "decode_cpu.csv")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        fig = plots.families_figure(tables, decode)
        fig.canvas.draw()
    assert not caught, [str(w.message) for w in caught]
    left, right = fig.axes
    fams = set(left.get_legend_handles_labels()[1])
    assert {"uniform quantization", "codebook quantization", "structured (channels/heads/blocks)", "low rank",
            "N:M sparsity", "prune + quantize"} <= fams
    speed = set(right.get_legend_handles_labels()[1])
    # structured points in the dtype their own rows were timed in (decode_dtype; fp32 before that column)
    own = set(tables["structured"].get("decode_dtype", pd.Series(dtype=str)).dropna()) or {"fp32"}
    # (the reference decode table predates speedup_vs_fastest_dense: the same-dtype baseline, named)
    own = own.pop()
    assert "uniform quantization (bf16 vs dense bf16)" in speed
    assert f"structured (channels/heads/blocks) ({own} vs dense {own})" in speed
    # rtn-w4-g64's point sits at the decode table's measured bf16 speedup of its format
    rtn = decode[(decode["label"] == "rtn-w4-g64-asym bf16")]["speedup_vs_dense"].astype(float).iloc[0]
    xs = {round(float(x), 6) for c in right.collections for x, _ in c.get_offsets()}
    assert round(rtn, 6) in xs
    # and a structured point at its own measured speedup
    assert round(float(tables["structured"]["decode_speedup"].dropna().iloc[0]), 6) in xs
    plots.plt.close(fig)
    full = dict(tables, quant=plots.sweep_table("quant", quick=False, root=root))
    with pytest.raises(plots.ContextMismatch):
        plots.families_figure(full, decode)


def _synthetic_gpu_results(root, revision, bits_list=(2, 4), m_values=(1, 2, 20),
                           timestamp="2026-12-10T00:00:00+00:00"):
    """``root/gpu/sweep.csv`` and ``decode4.csv`` written by gpu_check's own row code (the real columns) on
    CPU under the interpreter, with made-up timings (dense 2 ms, the kernel 1 ms at M=1, 4 ms above)."""
    import torch

    from benchmarks import gpu_check
    from experiments.core.results import write_rows

    def bench(fn):
        ms = 2.0 if "linear" in fn.__code__.co_names else (1.0 if x_rows[0] == 1 else 4.0)
        return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}
    prov = {**gpu_check.provenance(torch.device("cpu")), "device": "Fake GPU", "device_type": "cuda",
            "kernel_revision": revision, "timestamp": timestamp}
    for name, shapes, ms in (("sweep", [(64, 256)], m_values), ("decode4", [(64, 256), (32, 128)], (1,))):
        rows = []
        for M in ms:
            x_rows = [M]
            rows += gpu_check.run_dequant(torch.device("cpu"), 100.0, float("inf"), lambda r: None, shapes=shapes,
                                          bits_list=bits_list, m_values=(M,), bench=bench)
        write_rows(root / "gpu" / f"{name}.csv", [{**r, **prov} for r in rows])


def test_gpu_figures_from_a_synthetic_gpu_table(tmp_path, recwarn):
    """The Marlin-style figure (one line per bit width, the ideal 16/bits dashed) and the bandwidth figure
    from tables with gpu_check's columns; titles say whether the kernels are the current ones."""
    from triton_kernels.provenance import KERNEL_REVISION
    _synthetic_gpu_results(tmp_path, KERNEL_REVISION)
    rows = plots.gpu_dequant_rows(plots.gpu_tables(tmp_path))
    fig = plots.gpu_speedup_figure(rows)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"2-bit g128", "4-bit g128", "ideal 16/2 = 8", "ideal 16/4 = 4", "cuBLAS fp16"}
    assert list(lines["4-bit g128"].get_xdata()) == [1, 2, 20]
    assert list(lines["4-bit g128"].get_ydata()) == [2.0, 0.5, 0.5]  # dense 2 ms over the kernel's 1 / 4 ms
    assert lines["ideal 16/4 = 4"].get_linestyle() == "--" and list(lines["ideal 16/4 = 4"].get_ydata()) == [4, 4]
    assert "64x256" in ax.get_title() and "current kernels" in ax.get_title() and "Fake GPU" in ax.get_title()
    plots.plt.close(fig)
    fig = plots.gpu_bandwidth_figure(rows)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["cuBLAS fp16", "4-bit g128", "2-bit g128"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["64x256", "32x128"]  # largest first
    plots.plt.close(fig)
    paths = plots.draw_gpu_figures(tmp_path, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["gpu_bandwidth.png", "gpu_bandwidth.svg", "gpu_speedup_vs_batch.png",
                                             "gpu_speedup_vs_batch.svg"]
    assert not [str(w.message) for w in recwarn if "jit" not in str(w.message)]


def test_gpu_rows_of_old_kernels_are_labelled_and_replaced_by_current_ones(tmp_path):
    from experiments.analysis import summary
    from triton_kernels.provenance import KERNEL_REVISION
    _synthetic_gpu_results(tmp_path, KERNEL_REVISION - 1, bits_list=(4,), m_values=(1,))
    rows = plots.gpu_dequant_rows(plots.gpu_tables(tmp_path))
    fig = plots.gpu_speedup_figure(rows)
    assert "OLD kernels" in fig.axes[0].get_title()
    plots.plt.close(fig)
    status = summary.gpu_status(tmp_path)
    assert status.startswith("**GPU: no number measures the current kernels.**") and "Fake GPU" in status
    text = summary.gpu_summary(tmp_path)
    assert "**0 GPU numbers are of the current kernels**" in text
    assert ("| 4-bit g128, M=1: ≥ 3× cuBLAS fp16 | open: not measured on the current kernels "
            "(old kernels: 2×") in text
    # a newer run of the current kernels: its rows win, the older table stays listed as old
    (tmp_path / "gpu" / "sweep.csv").rename(tmp_path / "gpu" / "dequant.csv")
    _synthetic_gpu_results(tmp_path, KERNEL_REVISION, bits_list=(4,), m_values=(1,),
                           timestamp="2026-12-11T00:00:00+00:00")
    rows = plots.gpu_dequant_rows(plots.gpu_tables(tmp_path))
    assert set(rows["kernel_revision"]) == {KERNEL_REVISION}
    text = summary.gpu_summary(tmp_path)
    assert "| dequant.csv | 3 | Fake GPU |" in text and "| old kernels (revision 1) |" in text
    assert "| 4-bit g128, M=1: ≥ 3× cuBLAS fp16 | not met: 2× (64x256, Fake GPU" in text
    status = summary.gpu_status(tmp_path)
    assert status.startswith(f"**GPU** (current kernels, revision {KERNEL_REVISION}") and "`dequant.csv`" in status
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "gpu_speedup_vs_batch.png").write_bytes(b"")
    assert "![gpu speedup vs batch](results/figures/gpu_speedup_vs_batch.png)" in summary.gpu_status(tmp_path)


def test_claims_figure_draws_each_paired_claim_with_its_interval(tmp_path):
    import json

    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(0)
    base = rng.normal(3.3, 0.3, 8)
    ctx = {"model": "m", "corpus": "c", "evaluation_text": "P", "text_sha256": "a", "seqlen": "512",
           "eval_token_budget": "8192"}
    rows = [{**ctx, "point": p, "ppl": "30", "window_nll": json.dumps(list(base + d))}
            for p, d in (("rtn-w3-g64-asym", 0.3), ("gptq-w3-g64-asym", 0.0), ("rtn-w4-g64-asym", 0.0))]
    pd.DataFrame(rows).to_csv(tmp_path / "sweep_quant.csv", index=False)
    t = claims_table(root=tmp_path)
    fig = plots.claims_figure(t)
    fig.canvas.draw()
    assert len(fig.axes[0].get_yticklabels()) == len(t) == 2
    plots.plt.close(fig)
