# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 — Structured pruning: a smaller dense model that is faster everywhere
#
# Unstructured and N:M sparsity need special kernels to pay off. Structured pruning removes whole MLP
# channels, attention heads (whole k/v groups of the grouped-query attention) or transformer blocks, so
# the result is an ordinary dense model with smaller `nn.Linear` modules: smaller and faster with the
# stock kernels, the CPU included. Criteria: FLAP (fluctuation of the channel input × squared column
# norm, with bias compensation; `scope: global` is its adaptive search on scores standardized within each
# layer), FLAP's baselines magnitude-sp and Wanda-sp (the down_proj / o_proj input columns only; Wanda-sp
# block by block on the pruned model), this project's magnitude and Wanda (the same quantities over every
# weight the unit removes) and first-order Taylor (|w·∂L/∂w| on calibration text); for blocks, ShortGPT's
# Block Influence (1 − cos(block input, block output)) against dropping the last blocks.
#
# `sparsity` is the fraction of the pruned structures' parameters removed; `params_kept` the fraction of
# the whole model (embeddings included) that remains. Every point carries the speed of bf16 copies of the
# pruned and the dense model, measured back to back in the same run on the same machine: greedy-decode
# tokens/s, and the layer latency at the new shapes (every block linear alone at M=1, summed:
# `linears_m1_speedup`).
#
# Sweep definition: `experiments/sweeps/structured.yaml`; algorithms: `experiments/methods/algorithms/structured.py`.

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
df = plots.sweep_table("structured", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_structured.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
cols = ["point", "method", "criterion", "sparsity", "blocks", "params_kept", "ppl", "decode_tokens_per_s",
        "dense_decode_tokens_per_s", "decode_speedup", "linears_m1_speedup", "decode_dtype"]
df[[c for c in cols if c in df]].sort_values(["method", "criterion", "params_kept"])

# %% [markdown]
# ## Perplexity against parameters kept, and against the measured decode speedup

# %%
fig = plots.structured_figure(df)
plots.save(fig, "structured_ppl", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Orderings the papers report
# FLAP reports lower perplexity than its baseline Wanda-sp at equal parameters, and Wanda-sp than
# magnitude; ShortGPT reports that removing the blocks of lowest Block Influence beats dropping the last
# blocks. Each ratio below is the baseline's perplexity divided by the method's (above 1: the method is
# better) on this model and text, per structure, scope and sparsity.

# %%
s = df[(df["method"] != "dense") & df["criterion"].notna()]
s = s[s["quant_method"].isna()] if "quant_method" in s else s
w = s[s["method"] != "layers"].copy()
w["scope"] = w["scope"].astype(object).fillna("").replace("", "uniform") if "scope" in w else "uniform"
w["head_unit"] = w["head_unit"].astype(object).fillna("") if "head_unit" in w else ""
width = w.pivot_table(index=["method", "scope", "head_unit", "sparsity"], columns="criterion", values="ppl",
                      aggfunc="first")
for base, c in (("magnitude", "wanda"), ("magnitude", "flap"), ("magnitude", "taylor"),
                ("magnitude-sp", "wanda-sp"), ("wanda-sp", "flap")):
    if {base, c} <= set(width.columns):
        width[f"{base}_over_{c}"] = width[base] / width[c]
width

# %%
depth = s[s["method"] == "layers"].pivot_table(index="blocks", columns="criterion", values="ppl", aggfunc="first")
if {"bi", "last"} <= set(depth.columns):
    depth["last_over_bi"] = depth["last"] / depth["bi"]
depth

# %% [markdown]
# ## What each family buys: structured vs unstructured vs N:M vs low rank vs quantization
# Every sweep of the same mode (full or quick) on two axes. Left: perplexity against the size of the
# compressed block weights. Right: perplexity against the *measured* end-to-end decode speedup over the
# dense model on this machine: structured points carry their own (bf16, timed back to back with dense in
# the sweep; tables from before the `decode_dtype` column timed fp32); the other families take the decode table's row of their storage format in bf16 (the CPU's
# fast activations; `python -m experiments latency --decode`). On a CPU, the structured points and the
# low-bit quantization formats are the ones right of the dotted line; unstructured and 2:4 sparsity run
# as masked dense weights here and buy no speed.

# %%
tables = {}
for name in ("quant", "nonuniform", "sparsity", "lowrank", "combo", "structured"):
    try:
        tables[name] = plots.sweep_table(name, quick=quick, model=model, root=root)
    except plots.NoResults as e:
        print(f"{name}: left out ({e})")
decode = plots.optional_table(plots.results_dir(quick, root) / f"decode_{device}.csv")
fig = plots.families_figure(tables, decode)
plots.save(fig, "families", figures_dir)
plots.show(fig)
