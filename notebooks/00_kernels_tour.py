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
# # 00 — A tour of the kernels
#
# Three kernel families, each one file in `triton_kernels/` that imports only `torch` and `triton`:
#
# | file | computes | storage |
# |---|---|---|
# | `dequant_matmul.py` | `y = x @ dequant(W)^T` | 1–8-bit codes as a bit stream, group-wise scales/zeros |
# | `sparse_matmul.py` | `y = x @ (W ⊙ mask)^T` | block (BSR-like), N:M, 1-bit masks, activation sparsity |
# | `lowrank_linear.py` | `y = (x @ V^T) @ U^T` | two factors; fused kernel for small rank |
#
# Every kernel has a pure-torch `*_reference` with the same signature beside it. This notebook
# calls each kernel, checks it against its reference, shows how to copy one into your own project,
# and renders the GPU-readiness report.
#
# **No GPU is needed to run this notebook.** On a machine without one, the kernels run through
# Triton's interpreter (`TRITON_INTERPRET=1`, set below before the kernels are imported), which
# executes them on CPU tensors — correct, but slow, so the shapes here are small and no timing is
# taken from it.

# %% tags=["parameters"]
quick = False           # figures go to the quick or the full figures directory
device = "cpu"          # "cuda" runs the compiled kernels on a GPU
results_dir = None      # None: the committed reference results/; or a run directory such as "runs/local"
run_missing = True      # run the compile check when no table is found (into a run directory only)
figures_dir = None      # default: <run>/figures, or build/figures for the reference tables

# %%
import os

if device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernel modules are imported

import torch

from triton_kernels import dequant_matmul as dq
from triton_kernels import lowrank_linear as lr
from triton_kernels import sparse_matmul as sp

torch.manual_seed(0)


def report(name, y, ref):
    err = (y.double() - ref.double()).abs().max().item()
    rel = err / ref.double().abs().max().clamp_min(1e-30).item()
    print(f"{name:<28} shape {tuple(y.shape)}  max |err| {err:.2e}  rel {rel:.2e}")


# %% [markdown]
# ## Dequant-matmul: 3-bit weights, groups of 64, bf16 activations
# `pack` turns integer codes into a bit stream (exactly 3 bits per weight, codes straddle 32-bit
# words); `quantize_rtn` is round-to-nearest. The kernel dequantizes bit-exactly like `dequantize`.

# %%
N, K, M = 96, 200, 3
w = torch.randn(N, K)
q, scales, zeros = dq.quantize_rtn(w, 3, 64, False)
packed = dq.pack(q, 3)
print("packed", tuple(packed.shape), packed.dtype, f"= {packed.numel() * 32 / (N * K):.3f} bits per weight")
x = torch.randn(M, K, dtype=torch.bfloat16, device=device)
args = (packed.to(device), scales.to(device), zeros.to(device))
y = dq.dequant_matmul(x, *args, bits=3, group_size=64, symmetric=False)
report("dequant_matmul (3-bit)", y, dq.dequant_matmul_reference(x, *args, bits=3, group_size=64, symmetric=False))

# %% [markdown]
# ## Sparse: 2:4, 32×32 blocks, and activation sparsity

# %%
w = torch.randn(N, K)
nmw = sp.nm_compress(w * sp.nm_prune(w, 2, 4), 2, 4)  # *_prune helpers return the boolean mask (True = kept)
x = torch.randn(M, K, device=device)
report("nm_matmul (2:4)", sp.nm_matmul(x, nmw), sp.nm_matmul_reference(x, nmw))
bsw = sp.to_block_sparse(w * sp.block_prune(w, (32, 32), 0.75), (32, 32))
report("block_sparse_matmul (75%)", sp.block_sparse_matmul(x, bsw), sp.block_sparse_matmul_reference(x, bsw))
report("activation_sparse (|x|<0.7)", sp.activation_sparse_matmul(x, w, threshold=0.7),
       sp.activation_sparse_matmul_reference(x, w, threshold=0.7))
print("2:4 bytes:", nmw.memory_bytes(), " vs dense fp32:", N * K * 4)

# %% [markdown]
# ## Low rank: fused kernel, rank 16

# %%
U, V = lr.svd_factors(torch.randn(N, K), rank=16)
report("lowrank_linear (r=16)", lr.lowrank_linear(x, U, V), lr.lowrank_linear_reference(x, U, V))

# %% [markdown]
# ## The modules
# `QuantLinear`, `SparseLinear` and `LowRankLinear` wrap the kernels and pick a backend for the
# device: Triton on CUDA (and here, under the interpreter), torch's fast CPU kernels otherwise.

# %%
from triton_kernels.nn import LowRankLinear, QuantLinear, SparseLinear

lin = torch.nn.Linear(K, N)
for mod in (QuantLinear.from_linear(lin, 4, 32, False), SparseLinear.from_linear(lin, pattern="nm", n=2, m=4, sparsity=0.5),
            LowRankLinear.from_linear(lin, rank=32)):
    print(f"{type(mod).__name__:<14} {mod.bits_per_weight():6.2f} bits/weight  {mod.memory_bytes():>7} bytes  {mod.extra_repr()}")

# %% [markdown]
# ## Copying a kernel into your project
# Each family file imports only `torch`, `triton` and `triton.language`: copy
# `triton_kernels/dequant_matmul.py` (for example) next to your code and `import dequant_matmul`.
# The cell below proves it by importing the file in a fresh interpreter with only its own directory
# on the path.

# %%
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton_kernels

with tempfile.TemporaryDirectory() as d:
    for fam in ("dequant_matmul", "sparse_matmul", "lowrank_linear"):
        shutil.copy(Path(triton_kernels.__file__).parent / f"{fam}.py", d)
        out = subprocess.run([sys.executable, "-c", f"import {fam}; print({fam}.__name__, 'imports alone')"],
                             cwd=d, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": d})
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])

# %% [markdown]
# ## GPU readiness without a GPU
# `python -m triton_kernels.compile_check` compiles every autotune config of every kernel for sm_80,
# sm_90 and gfx942 the way the JIT would specialize it at launch, reads registers and spills (ptxas /
# AMDGCN metadata) and shared memory, and fails on any spill or shared memory above the limit.

# %%
import pandas as pd

from experiments.analysis import plots

root = plots.notebook_root("default", results_dir)
figures_dir = Path(figures_dir or plots.figures_dir_for(root, quick))
# The run's own compile check if it has one, else the reference one (the compile check is part of
# `make test`, not of `reproduce`); the line below says which table is shown.
table = next((p for p in (root / "compile_check.csv", plots.RESULTS / "compile_check.csv") if p.exists()),
             root / "compile_check.csv")
if not table.exists() and run_missing and not plots.is_reference(root):
    subprocess.run([sys.executable, "-m", "triton_kernels.compile_check", "--out", str(table)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, capture_output=True)
cc = pd.read_csv(table)
print(f"{(cc['status'] == 'ok').sum()}/{len(cc)} configs ok; compiled on: {cc['device'].iloc[0]}, "
      f"triton {cc['triton'].iloc[0]}; table: {table}")
cc.pivot_table(index=["kernel", "config"], columns="target", values=["registers", "spill_bytes", "shared_bytes"],
               aggfunc="first")

# %% [markdown]
# What the compiled code does with the weights (NVIDIA targets, read from the PTX and the SASS): the width
# of the loads that fetch the packed weights (a decode kernel must use 64- or 128-bit vectors: the check
# fails otherwise), local-memory instructions (must be 0) and tensor-core instructions (HMMA/HGMMA).

# %%
sass_cols = ["weight_load_bits", "weight_bytes_per_load", "local_mem_instrs", "tensor_core_instrs"]
if set(sass_cols) <= set(cc.columns):
    nv = cc[cc["target"].isin(["sm_80", "sm_90"])]
    display_table = nv.pivot_table(index=["kernel", "config"], columns="target", values=sass_cols, aggfunc="first")
else:
    display_table = "this compile-check table predates the load-width columns"
display_table

# %%
fig = plots.compile_check_figure(cc)
plots.save(fig, "compile_check", figures_dir)
plots.show(fig)
