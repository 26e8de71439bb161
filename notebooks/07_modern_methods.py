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
# # 07 — The methods researchers compare against today: HQQ, AWQ, rotations, mixed precision
#
# All four produce the same storage as RTN and GPTQ — `QuantLinear`'s asymmetric uniform grid, packed
# codes and fp16 group scales and zeros — so every kernel, export and CPU path runs them unchanged, and
# this notebook compares them with RTN and GPTQ point for point, at the same size:
#
# - **HQQ** (Badri & Shaji 2023; `experiments/methods/algorithms/hqq.py`, checked against `mobiusml/hqq`):
#   no calibration data; each group's zero-point is fitted to the weights by a half-quadratic solver of
#   an lp (p = 0.7) error. Its zero-points are *fractional* (rounded to integers only at 4 bits, as hqq's
#   `BaseQuantizeConfig` does), so at 2 and 3 bits the grid has no exact 0.
# - **AWQ** (Lin et al. 2024; `experiments/methods/algorithms/awq.py`, checked against `llm-awq`): per
#   input channel scales `s = mean|x|^alpha` searched on the calibration windows and folded into the
#   norms and `up_proj`, then weight clipping, then RTN (`awq`) or GPTQ (`awq+gptq`).
# - **Rotations** (QuaRot-style, weight-only; `experiments/methods/algorithms/rotate.py`): norms folded,
#   the residual stream and the v/o heads rotated by Hadamard matrices (Kronecker products with Paley's
#   12 for SmolLM2's 576 and 1536), an exact change of basis, then RTN (`quarot`) or GPTQ.
# - **Mixed precision under a bit budget** (`experiments/methods/families/mixed.py`): each block linear
#   gets one of bits {2, 3, 4, 8} × groups {64, 128}, the allocation that minimises the summed
#   Fisher-weighted weight error Σ F (W − Q(W))² within the budget, solved exactly as a knapsack (integer
#   program); budgets are effective bits per weight (codes plus scales and zeros), the same
#   `bits_per_weight` as every other row, so `mixed-b3.25` is no larger than RTN w3 g128 (3.27 here: K = 576 leaves a partial group).
#
# The papers' expected orderings: HQQ < RTN at every bits × group size, AWQ < RTN and close to GPTQ at
# 3 and 4 bits, AWQ + GPTQ composing, rotations < RTN, and a mixed allocation better than the uniform
# format of the same (or larger) size. The paired comparisons at the end say which of them this model's
# tables support; an ordering that fails is reported, not tuned away.

# %% tags=["parameters"]
quick = False           # False: the full sweep's table; True: the quick subset (<results>/quick/)
model = "default"       # the embedded SmolLM2 GGUF, an HF id/local path, or a .gguf file
results_dir = None      # None: the committed reference results/ (default model) or runs/local-<model> (another
                        # model); or a run directory such as "runs/local" (what `make reproduce` wrote)
run_missing = True      # run a missing sweep into that run directory (never into the reference results/)
figures_dir = None      # default: <run>/figures, or build/figures for the reference tables

# %%
from pathlib import Path

from experiments.analysis import plots
from experiments.analysis.claims import claims_table

root = plots.notebook_root(model, results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
df = plots.sweep_table("modern", quick=quick, run_missing=run_missing, model=model, root=root)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_modern.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
cols = ["point", "bits", "group_size", "bits_per_weight", "ppl", "ppl_lo", "ppl_hi", "kl", "top1", "ppl2",
        "compress_seconds"]
df[[c for c in cols if c in df]].sort_values(["bits_per_weight", "point"])

# %% [markdown]
# ## Perplexity by size, and what each method costs

# %%
fig = plots.modern_figure(df)
plots.save(fig, "modern", figures_dir)
plots.show(fig)

# %% [markdown]
# ## Where the mixed allocations put their bits
# One row per budget: block on x, layer on y, colour = bits of the codes (dots: the smaller groups).

# %%
fig = plots.allocation_figure(df)
if fig is None:
    print("no mixed-precision rows in this table")
else:
    plots.save(fig, "mixed_allocation", figures_dir)
    plots.show(fig)

# %% [markdown]
# ## The papers' orderings, paired
# Each claim compares two rows on the same evaluation windows (`experiments.analysis.claims`): ΔNLL per
# token with its 95% bootstrap interval; *holds* below 0, **within noise** across 0, **reversed** above.

# %%
t = claims_table(quick, root)
t[t["sweep"] == "modern"][["claim", "ppl_better", "ppl_worse", "dnll", "dnll_lo", "dnll_hi", "verdict", "verdict2"]]
