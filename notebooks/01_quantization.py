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
# # 01 — What does 2/3/4/8-bit weight quantization cost?
#
# Perplexity of the default model (SmolLM2-135M-Instruct, Jane Austen evaluation text) after
# quantizing every linear layer of every transformer block with round-to-nearest (RTN) or GPTQ,
# at several group sizes, against the **effective** bits per weight (packed codes + scales + zeros,
# counted from `QuantLinear.memory_bytes()`).
#
# **Caveat — source grid.** The default model ships as a Q4_1 GGUF (asymmetric 4-bit, groups of 32,
# fractional zero points): its fp32 weights already lie on a 4-bit grid. A setting that reproduces that
# grid exactly would recover the stored weights and say nothing about 4-bit accuracy; such rows carry
# `aliases_source_grid = True` and are drawn hollow in red. This toolkit's RTN and GPTQ use *integer*
# zero points, which cannot express Q4_1's fractional ones, so asymmetric 4-bit g32 does **not**
# reproduce the weights (the rule is `experiments.lm.models.aliases_source_grid`, tested by requantizing
# grid weights). Those points are real measurements, but favourable ones: the weights start on a
# 4-bit, group-32 grid. Read the 4-bit g32 points with that in mind.
#
# The sweep itself is defined as data in `experiments/sweeps/quant.yaml`; this notebook only reads
# its table: by default the committed reference `results/sweep_quant.csv` (`results/quick/` with
# `quick = True`); set `results_dir` to a run directory (e.g. `runs/local`, what `make reproduce`
# writes) to see your own run. A missing table is run into that run directory.

# %% tags=["parameters"]
quick = False           # False: the full sweep's tables; True: the quick subset (<results>/quick/)
model = "default"       # the embedded SmolLM2 GGUF, an HF id/local path, or a .gguf file
device = "cpu"
results_dir = None      # None: the committed reference results/ (default model) or runs/local-<model> (another
                        # model); or a run directory such as "runs/local" (what `make reproduce` wrote)
run_missing = True      # run a missing sweep into that run directory (never into the reference results/)
figures_dir = None      # default: <run>/figures, or build/figures for the reference tables

# %%
from pathlib import Path

from experiments.analysis import plots

root = plots.notebook_root(model, results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
df = plots.sweep_table("quant", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_quant.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
cols = ["point", "bits", "group_size", "bits_per_weight", "compression_vs_fp16", "ppl", "aliases_source_grid"]
df[cols].sort_values(["bits", "group_size", "point"])

# %% [markdown]
# ## Perplexity against effective bits per weight

# %%
fig = plots.quant_figure(df)
plots.save(fig, "quant_ppl_vs_bits", figures_dir)
plots.show(fig)

# %% [markdown]
# ## GPTQ against RTN at the same grid
# The ratio below is RTN perplexity over GPTQ perplexity for each (bits, group size); above 1 means
# GPTQ's error compensation helped.

# %%
q = df[df["method"].isin(["rtn", "gptq"])]
wide = q.pivot_table(index=["bits", "group_size"], columns="method", values="ppl")
if {"rtn", "gptq"} <= set(wide.columns):
    wide["rtn_over_gptq"] = wide["rtn"] / wide["gptq"]
wide
