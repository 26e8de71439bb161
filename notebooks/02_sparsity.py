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
# # 02 — What does 50–80% / 2:4 / block sparsity cost?
#
# Perplexity of the default model after pruning every linear layer of every transformer block with
# magnitude pruning, Wanda (|W|·‖X‖) or SparseGPT (OBS updates), as unstructured masks at 50–80%,
# N:M (2:4, 4:8) and 32×32 blocks. The pruned layers are real `SparseLinear` modules: the evaluation
# runs through their forward, not through a dense copy.
#
# Sweep definition: `experiments/sweeps/sparsity.yaml`.

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
df = plots.sweep_table("sparsity", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_sparsity.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
df[["point", "pattern", "sparsity", "bits_per_weight", "compression_vs_fp16", "ppl"]].sort_values(["pattern", "sparsity", "point"])

# %% [markdown]
# ## Perplexity against sparsity, and per structured pattern

# %%
fig = plots.sparsity_figure(df)
plots.save(fig, "sparsity_ppl", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Calibrated methods against magnitude at the same pattern
# Magnitude perplexity divided by each method's perplexity (above 1: better than magnitude).

# %%
s = df[df["method"] != "dense"]
wide = s.pivot_table(index=["pattern", "sparsity"], columns="method", values="ppl", aggfunc="first")
for m in ("wanda", "sparsegpt"):
    if {"magnitude", m} <= set(wide.columns):
        wide[f"magnitude_over_{m}"] = wide["magnitude"] / wide[m]
wide
