"""Compile-check cases for ``triton_kernels.lowrank_linear``: every autotune config of both kernels.

Representative problem: a 4096 x 4096 layer in bfloat16, M = 128 rows. The fused kernel is compiled
for rank 32 (R_PAD 64 bucket), 128 (the auto threshold) and 256 (the largest forced fused rank),
each with every config of its bucket; the two-GEMM kernel for rank 1024 with every config, once
for each of its two launches (x @ V^T with N = r, then t @ U^T + bias with K = r).
fp16 compiles the same tiles (same element size); fp32 is not compiled (twice the shared memory;
the autotuner skips configs that fail to load on a GPU).
"""
import torch

from triton_kernels.compile_cases.case import Case
from triton_kernels.lowrank_linear import (fused_configs, lowrank_fused_kernel, lowrank_matmul_kernel,
                                           matmul_configs)

M, N, K = 128, 4096, 4096
DTYPE = torch.bfloat16


def _name(cfg) -> str:
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']}_BN{kw['BLOCK_N']}_BK{kw['BLOCK_K']}_w{cfg.num_warps}_s{cfg.num_stages}"


def _meta(cfg, **extra) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **extra}


def cases() -> list[Case]:
    out = []
    x = torch.empty(M, K, dtype=DTYPE)
    y = torch.empty(M, N, dtype=DTYPE)
    bias = torch.empty(N, dtype=DTYPE)
    fused = lowrank_fused_kernel.fn  # the JITFunction under the autotuner
    for r in (32, 128, 256):
        r_pad = max(16, 1 << (r - 1).bit_length())
        U = torch.empty(N, r, dtype=DTYPE)
        V = torch.empty(r, K, dtype=DTYPE)
        for cfg in fused_configs(r_pad, interpret=False):
            args = (x, U, V, bias, y, M, N, K, r,
                    x.stride(0), x.stride(1), U.stride(0), U.stride(1), V.stride(0), V.stride(1),
                    y.stride(0), y.stride(1))
            out.append(Case(fused, f"lowrank_fused_r{r}", _name(cfg), args,
                            _meta(cfg, HAS_BIAS=True, R_PAD=r_pad, DOT_UPCAST=False), weight_args=(1, 2)))
    r = 1024
    U = torch.empty(N, r, dtype=DTYPE)
    V = torch.empty(r, K, dtype=DTYPE)
    t = torch.empty(M, r, dtype=DTYPE)
    mm = lowrank_matmul_kernel.fn
    for cfg in matmul_configs(interpret=False):
        first = (x, V, t, t, M, r, K, x.stride(0), x.stride(1), V.stride(0), V.stride(1),
                 t.stride(0), t.stride(1))
        second = (t, U, bias, y, M, N, r, t.stride(0), t.stride(1), U.stride(0), U.stride(1),
                  y.stride(0), y.stride(1))
        out.append(Case(mm, "lowrank_two_gemm_xVt_r1024", _name(cfg), first,
                        _meta(cfg, HAS_BIAS=False, DOT_UPCAST=False), weight_args=(1,)))
        out.append(Case(mm, "lowrank_two_gemm_tUt_r1024", _name(cfg), second,
                        _meta(cfg, HAS_BIAS=True, DOT_UPCAST=False), weight_args=(1,)))
    return out
