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
# Four kernel families, each one file in `triton_kernels/` that imports only `torch` and `triton`:
#
# | file | computes | storage |
# |---|---|---|
# | `dequant_matmul.py` | `y = x @ dequant(W)^T` | 1–8-bit codes as bit planes, group-wise scales/zeros |
# | `codebook_matmul.py` | `y = x @ (T[q] * s)^T` | the same bit planes, indices into a lookup table |
# | `sparse_matmul.py` | `y = x @ (W ⊙ mask)^T` | block (BSR-like), N:M, 1-bit masks, activation sparsity |
# | `lowrank_linear.py` | `y = (x @ V^T) @ U^T` | two factors; fused kernel for small rank |
#
# Each file reads top to bottom like a Triton tutorial: a docstring with the contract (math, shapes,
# dtypes, layout, limits), the autotune configs and their pruning, the `@triton.jit` kernels, the
# launchers, a pure-torch `*_reference` with the same signature, and the packing helpers. The layouts
# in full, the design reasons and the tiles that were tried and dropped are in `docs/kernels.md`;
# measurements are in tables under `results/`, never in the code. This notebook calls each kernel,
# checks it against its reference, looks inside a packed weight, shows how to copy a file into your own
# project, and renders the GPU-readiness report.
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
# `quantize_rtn` is round-to-nearest; `pack` turns the integer codes into bit planes (exactly 3 bits
# per weight, see below). The kernel dequantizes bit-exactly like `dequantize`:
# `w = (q - z) * s` per group of `group_size` weights of a row, in fp32.

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
# ## Inside a packed weight: bit planes
# A `bits`-bit code is split into power-of-two planes, low bits first (3 = 2 + 1, 5 = 4 + 1,
# 6 = 4 + 2, 7 = 4 + 2 + 1). Each row of `packed` is one LSB-first bit stream: the 2-bit field of all
# K codes, then the 1-bit field of all K codes, so inside a plane no code straddles a 32-bit word and a
# kernel loads whole words and unpacks them with shifts, and a weight still costs exactly 3 bits.
# For one row of K = 64 codes: words 0–3 hold the low 2 bits (16 codes per word, code k at shift
# 2·(k % 16)), words 4–5 the high bit (32 per word). 1, 2, 4 and 8 bits are a single plane: the
# familiar layout (4 bits: code k at shift 4·(k % 8) of word k // 8).
# The words print most significant bit first, so code 0's field is the rightmost.

# %%
codes = torch.arange(64).remainder(8).reshape(1, 64)  # one row: 0, 1, ..., 7, 0, 1, ...
row = dq.pack(codes, 3)[0]
print("planes(3) =", dq.planes(3), f"-> {row.numel()} words for 64 codes")
for i, word in enumerate(row.tolist()):
    plane = "low 2 bits" if i < 4 else "bit 2"
    print(f"word {i} ({plane:>10}): {word & 0xFFFFFFFF:032b}")
assert torch.equal(dq.unpack(dq.pack(codes, 3), 3, 64), codes.to(torch.uint8))

# %% [markdown]
# ## Codebook: 4-bit codes into a shared table (NF4-like)
# The same bit planes, but a code indexes a table of 2^bits values (one shared table, or one per row),
# times an optional group scale: `W[n, k] = T[q[n, k]] * s`. How the kernels look the table up
# (register selects, warp shuffles or loads, by table size) is in `docs/kernels.md`.

# %%
from triton_kernels import codebook_matmul as cb

table = torch.linspace(-1, 1, 16).reshape(1, 16)
cq = torch.randint(0, 16, (N, K))
cb_args = (cb.pack(cq, 4).to(device), table.to(device), scales.to(device))
y = cb.codebook_matmul(x, *cb_args, bits=4, group_size=64)
report("codebook_matmul (4-bit)", y, cb.codebook_matmul_reference(x, *cb_args, bits=4, group_size=64))

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
# on the path (`tests/test_kernel_copies.py` does the same, refusing the project's own packages).

# %%
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton_kernels

with tempfile.TemporaryDirectory() as d:
    for fam in ("dequant_matmul", "codebook_matmul", "sparse_matmul", "lowrank_linear"):
        shutil.copy(Path(triton_kernels.__file__).parent / f"{fam}.py", d)
        out = subprocess.run([sys.executable, "-c", f"import {fam}; print({fam}.__name__, 'imports alone')"],
                             cwd=d, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": d})
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])

# %% [markdown]
# ## GPU readiness without a GPU
# `python -m triton_kernels.compile_check` compiles every autotune config of every kernel for sm_80,
# sm_90 and gfx942 the way the JIT would specialize it at launch, reads registers and spills (ptxas /
# AMDGCN metadata) and shared memory, and fails on any spill or shared memory above the limit. Its
# table is where the kernels' static facts live (one row per kernel, config and target); the files'
# comments point to its rows instead of repeating numbers. Timings on a GPU are in `results/gpu/`
# (`make gpu-check`); each row's `git_commit` says which version of a kernel it measured.

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
