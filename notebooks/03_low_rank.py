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
# # 03 — What does a rank-r factorization cost?
#
# Every linear layer W (N×K) of every block replaced by U·V with rank r chosen so that r·(N+K) is a
# fraction ("ratio") of N·K. Plain truncated SVD against activation-aware SVD (whitening by the
# Cholesky factor of the calibration Gram matrix, as in SVD-LLM). The evaluation runs through the
# real `LowRankLinear` modules.
#
# Sweep definition: `experiments/sweeps/lowrank.yaml`.

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
df = plots.sweep_table("lowrank", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_lowrank.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
df[["point", "ratio", "bits_per_weight", "compression_vs_fp16", "ppl"]].sort_values(["ratio", "point"])

# %% [markdown]
# ## Perplexity against the fraction of parameters kept

# %%
fig = plots.lowrank_figure(df)
plots.save(fig, "lowrank_ppl_vs_ratio", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Activation-aware against plain SVD at the same ratio
# Plain-SVD perplexity divided by activation-aware perplexity (above 1: whitening helped).

# %%
wide = df[df["method"] != "dense"].pivot_table(index="ratio", columns="method", values="ppl", aggfunc="first")
if {"svd", "whitened_svd"} <= set(wide.columns):
    wide["svd_over_whitened"] = wide["svd"] / wide["whitened_svd"]
wide
