# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
# reproduce the weights (the rule is `experiments.models.aliases_source_grid`, tested by requantizing
# grid weights). Those points are real measurements, but favourable ones: the weights start on a
# 4-bit, group-32 grid. Read the 4-bit g32 points with that in mind.
#
# The sweep itself is defined as data in `experiments/sweeps/quant.yaml`; this notebook only reads
# its table (`results/sweep_quant.csv`, or `results/quick/` in quick mode) and runs the sweep if the
# table is missing.

# %% tags=["parameters"]
quick = True            # quick subset and budgets (results/quick/); False: the full sweep (results/)
model = "default"       # the embedded SmolLM2 GGUF, an HF id/local path, or a .gguf file
device = "cpu"
run_missing = True      # run the sweep when its table is missing
figures_dir = None      # default: results/figures (results/quick/figures in quick mode)

# %%
from pathlib import Path

from experiments import plots

figures_dir = Path(figures_dir or plots.results_dir(quick) / "figures")
df = plots.sweep_table("quant", quick=quick, run_missing=run_missing, model=model)
cols = ["point", "bits", "group_size", "bits_per_weight", "compression_vs_fp16", "ppl", "aliases_source_grid"]
df[cols].sort_values(["bits", "group_size", "point"])

# %% [markdown]
# ## Perplexity against effective bits per weight

# %%
fig = plots.quant_figure(df)
plots.save(fig, "quant_ppl_vs_bits", figures_dir)
fig

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
