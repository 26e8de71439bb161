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
# # 05 — Non-uniform grids: do learned levels beat evenly spaced ones?
#
# A uniform grid spaces its `2^bits` levels evenly between a group's minimum and maximum. Weights are
# not uniformly distributed (they are bell-shaped with long tails), so a grid with more levels near
# zero can lose less. This notebook compares, at 2, 3 and 4 bits, perplexity of the default model
# after quantizing every linear layer of every transformer block onto:
#
# - **uniform** grids: RTN and GPTQ (`experiments/methods/algorithms/quant.py`, `QuantLinear`);
# - **fixed non-uniform tables** times group absmax scales: NormalFloat (`nf`, QLoRA's NF4 table;
#   NF2/NF3 built the same way) and FP4 E2M1 (`fp4`, the MX/NVFP4 element grid);
# - **fitted tables per output row**: `piecewise` (segments of levels, each with its own step),
#   `kmeans` (1-D k-means of the row), both with an exact zero level in every row's table (`-nozero`:
#   without it), and `squeezellm` (k-means weighted by each weight's Fisher information, the squared
#   gradients of the dense model's loss on the calibration windows; `-diagh`: weighted by the diagonal
#   of `X^T X` of the layer's inputs instead);
# - **GPTQ over a table** (`+gptq`): GPTQ's error feedback rounding to the nearest table entry.
#
# All non-uniform points run through `CodebookLinear` (packed codes + a lookup table); bits per weight
# count the codes, the tables and the scales (16 bits each), so a per-row table's `2^bits` entries are
# paid for. The algorithms are in `experiments/methods/algorithms/codebook.py`, the family in
# `experiments/methods/families/codebook.py`, the sweep in `experiments/sweeps/nonuniform.yaml`.
#
# **Caveat — source grid.** The default model ships as a Q4_1 GGUF (asymmetric 4-bit, groups of 32):
# its weights already lie on a uniform 4-bit grid, which favours uniform 4-bit settings at small group
# sizes. The 2- and 3-bit points do not have that bias.
#
# Expected (SqueezeLLM and QLoRA papers, on LLaMA-scale models): at 3 bits per-channel
# `squeezellm < gptq < rtn` in perplexity, and `nf` 4-bit no worse than RTN 4-bit at the same group
# size. And on this model: k-means and piecewise tables need their zero level. A few input channels
# carry activations thousands of times the median (attention sinks) through tiny weights; a table
# without an exact 0 turns those weights into the smallest level, about twice their size, and the
# sink tokens multiply that error. The tables below check all of it on this model and say what they
# find.

# %% tags=["parameters"]
quick = False           # False: the full sweep's table; True: the quick subset (<results>/quick/)
model = "default"       # the embedded SmolLM2 GGUF, an HF id/local path, or a .gguf file
device = "cpu"
results_dir = None      # None: the committed reference results/ (default model) or runs/local-<model> (another
                        # model); or a run directory such as "runs/local" (what `make reproduce` wrote)
run_missing = True      # run a missing sweep into that run directory (never into the reference results/)
figures_dir = None      # default: <run>/figures, or build/figures for the reference tables
layer = "model.layers.15.mlp.down_proj"   # the layer whose weights the histogram shows
row = 0                 # which output row of it
hist_bits = 3           # the grids drawn over the histogram

# %%
from pathlib import Path

from experiments.analysis import plots

root = plots.notebook_root(model, results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
df = plots.sweep_table("nonuniform", quick=quick, run_missing=run_missing, model=model, root=root)
df["series"] = plots.nonuniform_series(df)
print(f"{len(df)} points of {df['model'].iloc[0]} from {plots.results_dir(quick, root) / 'sweep_nonuniform.csv'}; "
      f"dense perplexity {plots.dense_ppl(df) or float('nan'):.4g}, measured on {df['device'].iloc[0]}")
cols = ["point", "series", "bits", "bits_per_weight", "compression_vs_fp16", "ppl", "weight_rel_error"]
df[cols].sort_values(["bits", "series"])

# %% [markdown]
# ## Perplexity against effective bits per weight
# Uniform grids are grey and dashed, non-uniform tables coloured and solid.

# %%
fig = plots.nonuniform_figure(df)
plots.save(fig, "nonuniform_ppl_vs_bits", figures_dir)
plots.show(fig)

# %% [markdown]
# ## The expected orderings, checked on this model
# Each line compares perplexities measured in this table; a comparison whose points are not in it
# (e.g. in quick mode) says so.

# %%
def ppl_of(series: str, bits: int):
    hit = df[(df["series"] == series) & (df["bits"].astype(float) == bits)]
    return float(hit["ppl"].iloc[0]) if len(hit) else None


def check(names, bits, what):
    vals = {n: ppl_of(n, bits) for n in names}
    missing = [n for n, v in vals.items() if v is None]
    if missing:
        return f"{what}: not in this table ({', '.join(missing)} missing)"
    got = " < ".join(sorted(vals, key=vals.get))
    holds = all(vals[a] <= vals[b] for a, b in zip(names, names[1:]))
    shown = ", ".join(f"{n} {v:.3g}" for n, v in vals.items())
    return f"{what}: {'holds' if holds else 'does NOT hold'} (measured order {got}; {shown})"


print(check(["squeezellm pc", "gptq pc", "rtn pc"], 3, "3-bit per-channel squeezellm < gptq < rtn"))
print(check(["squeezellm pc", "rtn pc"], 3, "3-bit per-channel squeezellm < rtn"))
for g in ("g64", "g128", "pc"):
    print(check([f"nf {g}", f"rtn {g}"], 4, f"4-bit {g}: nf <= rtn"))
for m in ("kmeans", "piecewise"):
    print(check([f"{m} g128", "rtn g128"], 3, f"3-bit g128: {m} (zero level) < rtn"))
    print(check([f"{m} g128", f"{m}-nozero g128"], 3, f"3-bit g128: {m} with the zero level < without"))

# %% [markdown]
# ## Where the levels go: one real weight row
# The histogram of one output row of a real layer, with the levels each `hist_bits`-bit per-channel
# grid gives that row: the uniform RTN grid, the NormalFloat table scaled by the row's absmax, and the
# levels k-means and the piecewise-linear fit learn from the row itself.

# %%
import torch

from experiments.methods.algorithms import codebook as cb
from experiments.methods.algorithms import quant
from experiments.lm.models import load_model

net, _, info = load_model(model)
W = dict(net.named_modules())[layer].weight.detach().float()
w = W[row:row + 1]
del net
u = quant.rtn(w, bits=hist_bits, group_size=-1, symmetric=False)
levels = {
    f"RTN {hist_bits}-bit (uniform)": (torch.arange(2 ** hist_bits) - u.zeros[0, 0]) * u.scales[0, 0],
    f"NF{hist_bits} x absmax": cb.nf(w, bits=hist_bits, group_size=-1).codebook[0] * w.abs().max(),
    f"k-means {hist_bits}-bit": cb.kmeans(w, bits=hist_bits).codebook[0],
    f"piecewise {hist_bits}-bit": cb.piecewise(w, bits=hist_bits).codebook[0],
}
errors = {name: float(((w - lv[cb.nearest_codes(w, lv[None, :])]) ** 2).mean()) for name, lv in levels.items()}
for name, e in errors.items():
    print(f"{name:28s} mean squared error on this row {e:.3g}")
fig = plots.levels_figure(w, levels, title=f"{info['name']}: {layer}, row {row} ({W.shape[1]} weights)")
plots.save(fig, "nonuniform_levels_histogram", figures_dir)
plots.show(fig)
