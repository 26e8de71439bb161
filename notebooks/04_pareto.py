# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 — All methods on one accuracy–memory–latency frontier
#
# Every measured point of the four sweeps (quantization, sparsity, low rank, and pruning followed by
# quantization) on two planes: perplexity against effective bits per weight, and perplexity against
# the measured layer speedup over dense. A point is on the Pareto frontier when nothing else is both
# smaller (or faster) and more accurate.
#
# **Latency here is what this machine measured.** On a CPU it is the modules' CPU backends
# (torch's weight-only int4/int8 kernels, BSR/CSR, two dense matmuls, or masked dense where torch has
# nothing faster) against dense fp32 at the model's own layer shapes, M = 1 (decode). It is not a GPU
# number; the GPU design targets are in `00_kernels_tour` (compile report) and the roofline model below.
#
# Combination rows (pruning then quantization) run through `SparseLinear` over the dequantized kept
# weights; their size is *modelled* (sparse indices + `bits` per kept value + scales/zeros) because no
# fused sparse+quantized kernel exists yet (`size_is_modelled` column).

# %% tags=["parameters"]
quick = False           # False: the full sweeps' tables; True: the quick subsets (<results>/quick/)
model = "default"       # the embedded SmolLM2 GGUF, an HF id/local path, or a .gguf file
device = "cpu"          # whose latency table to show / measure when missing ("cuda" on a GPU)
results_dir = None      # None: the committed reference results/ (default model) or runs/local-<model> (another
                        # model); or a run directory such as "runs/local" (what `make reproduce` wrote)
run_missing = True      # run missing sweeps / latency into that run directory (never into the reference)
figures_dir = None      # default: <run>/figures, or build/figures for the reference tables


# %%
from pathlib import Path

import pandas as pd

from experiments.analysis import plots

root = plots.notebook_root(model, results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
tables = {name: plots.sweep_table(name, quick=quick, run_missing=run_missing, model=model, root=root)
          for name in plots.SWEEPS}
device_type = "cuda" if device.startswith("cuda") else "cpu"
latency_csv = plots.results_dir(quick, root) / f"latency_{device_type}.csv"
if not latency_csv.exists() and run_missing and not plots.is_reference(root):
    import argparse

    from experiments.measure import latency
    latency.main(argparse.Namespace(quick=quick, sweep="all", device=device, decode=False, resume=True,
                                    min_run_time=None, out=str(latency_csv)))
latency_table = plots.measurement_table(latency_csv)  # refuses a table that mixes machines
print(f"sweeps from {plots.results_dir(quick, root)}; latency: "
      + (f"{latency_csv} ({latency_table['device'].iloc[0]})" if latency_table is not None else "none"))
all_points = pd.concat([t.assign(sweep=n) for n, t in tables.items()], ignore_index=True)
all_points[["sweep", "point", "bits_per_weight", "compression_vs_fp16", "ppl", "aliases_source_grid"]].sort_values("bits_per_weight")

# %% [markdown]
# ## The frontier

# %%
# The speed half: measured end-to-end decode speedups by storage format (bf16, `latency --decode`)
# where the run has them, else the layer latencies summed over the model's shapes.
decode_table = plots.measurement_table(plots.results_dir(quick, root) / f"decode_{device_type}.csv")
fig = plots.pareto_figure(tables, latency_table, decode=decode_table)
plots.save(fig, "pareto", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Layer latency on this machine (4096×4096, the standard LLM shape)

# %%
if latency_table is not None:
    fig = plots.latency_figure(latency_table)
    plots.save(fig, "latency_4096", figures_dir)
    plots.show(fig)
    display(plots.model_layer_speedup(latency_table).sort_values("speedup", ascending=False))

# %% [markdown]
# ## Roofline model for GPUs (a model, not a measurement)
# Ideal time = max(bytes moved / peak bandwidth, FLOPs / peak fp16 tensor FLOP rate), bytes counted
# from the modules' own `memory_bytes()`. Measured GPU points appear only where a GPU ran.

# %%
roof = plots.roofline_table(quick, root)  # written by `python -m experiments roofline`
if roof is None and run_missing:
    from experiments.measure import roofline
    roof = pd.DataFrame(roofline.table())
measured = plots.measurement_table(plots.results_dir(quick, root) / "latency_cuda.csv")
if roof is not None:
    fig = plots.roofline_figure(roof, measured=measured)
    plots.save(fig, "roofline_h100_4096", figures_dir)
    plots.show(fig)
else:
    print(f"no roofline table in {root}: run `python -m experiments roofline`")

# %% [markdown]
# ## Which orderings survive the noise
# Every ordering the project reports (`experiments.analysis.claims.CLAIMS`), checked on these tables:
# the paired NLL difference per token between the two points on the same evaluation windows, with its
# 95% bootstrap interval over windows (and on the second text, *Emma*, where the rows have it). A claim
# *holds* when the whole interval is below 0; an interval across 0 is **within noise**, not a finding.
# Rows measured before the per-window column existed cannot be paired and are left out of the figure.
# The error bars on the frontier above are each point's own 95% perplexity interval.

# %%
from experiments.analysis.claims import claims_table

claims = claims_table(quick, root)
fig = plots.claims_figure(claims)
plots.save(fig, "claims", figures_dir)
plots.show(fig)
claims[["claim", "sweep", "ppl_better", "ppl_worse", "dnll", "dnll_lo", "dnll_hi", "verdict", "verdict2"]]
