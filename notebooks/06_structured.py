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
# # 06 — Structured pruning: a smaller dense model that is faster everywhere
#
# Unstructured and N:M sparsity need special kernels to pay off. Structured pruning removes whole MLP
# channels, attention heads (whole k/v groups of the grouped-query attention) or transformer blocks, so
# the result is an ordinary dense model with smaller `nn.Linear` modules: smaller and faster with the
# stock kernels, the CPU included. Criteria: magnitude (weight norms), Wanda (|W|·‖X‖ over the
# structure), FLAP (fluctuation of the channel input × squared column norm, with bias compensation) and
# first-order Taylor (|w·∂L/∂w| on calibration text); for blocks, ShortGPT's Block Influence
# (1 − cos(block input, block output)) against dropping the last blocks.
#
# `sparsity` is the fraction of the pruned structures' parameters removed; `params_kept` the fraction of
# the whole model (embeddings included) that remains. Every point carries the greedy-decode tokens/s of
# the pruned and the dense model, measured back to back in the same run on the same machine.
#
# Sweep definition: `experiments/sweeps/structured.yaml`; algorithms: `experiments/algorithms/structured.py`.

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

from experiments import plots

root = plots.notebook_root(model, results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
df = plots.sweep_table("structured", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_structured.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
cols = ["point", "method", "criterion", "sparsity", "blocks", "params_kept", "ppl", "decode_tokens_per_s",
        "dense_decode_tokens_per_s", "decode_speedup"]
df[[c for c in cols if c in df]].sort_values(["method", "criterion", "params_kept"])

# %% [markdown]
# ## Perplexity against parameters kept, and against the measured decode speedup

# %%
fig = plots.structured_figure(df)
plots.save(fig, "structured_ppl", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Orderings the papers report
# FLAP and Wanda-sp report lower perplexity than magnitude at equal parameters; ShortGPT reports that
# removing the blocks of lowest Block Influence beats dropping the last blocks. Each ratio below is the
# baseline's perplexity divided by the method's (above 1: the method is better) on this model and text.

# %%
s = df[(df["method"] != "dense") & df["criterion"].notna()]
s = s[s["quant_method"].isna()] if "quant_method" in s else s
width = s[s["method"] != "layers"].pivot_table(index=["method", "sparsity"], columns="criterion", values="ppl",
                                               aggfunc="first")
for c in ("wanda", "flap", "taylor"):
    if {"magnitude", c} <= set(width.columns):
        width[f"magnitude_over_{c}"] = width["magnitude"] / width[c]
width

# %%
depth = s[s["method"] == "layers"].pivot_table(index="blocks", columns="criterion", values="ppl", aggfunc="first")
if {"bi", "last"} <= set(depth.columns):
    depth["last_over_bi"] = depth["last"] / depth["bi"]
depth
