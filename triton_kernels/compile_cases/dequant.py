"""Compile-check cases for ``triton_kernels.dequant_matmul``.

Every autotune config of both kernels on a representative 4096 x 4096 problem, in the two variants
that bound the resource use: 4-bit with group 128 (the common case: no straddling codes, one scale
per row per K block) and 3-bit with group 32 (the heaviest: codes straddle words, so a second load,
and groups narrower than BLOCK_K, so a gathered scale/zero tile). A few more variants (8-bit
symmetric, per-channel, fp32 activations) on each kernel's first config cover the remaining
constexpr branches without compiling the full product.
"""
import torch

from triton_kernels.compile_check import Case
from triton_kernels.dequant_matmul import (dequant_gemv_kernel, dequant_matmul_kernel, fp32_configs,
                                           gemv_configs, matmul_configs)

N = K = 4096


def _weight(bits: int, group_size: int):
    words = (K * bits + 31) // 32
    groups = 1 if group_size == -1 else (K + group_size - 1) // group_size
    packed = torch.zeros((N, words), dtype=torch.int32)
    scales = torch.ones((N, groups), dtype=torch.float16)
    zeros = torch.zeros((N, groups), dtype=torch.float16)
    return packed, scales, zeros


def _gemv_case(cfg, bits, group_size, symmetric, block_m, act=torch.bfloat16):
    M = block_m
    x = torch.zeros((M, K), dtype=act)
    packed, scales, zeros = _weight(bits, group_size)
    bias = torch.zeros((N,), dtype=act)
    ws = torch.zeros((M, N), dtype=torch.float32)
    args = (x, packed, scales, zeros, bias, ws, M, N, K,
            x.stride(0), x.stride(1), packed.stride(0), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), ws.stride(0))
    meta = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=True, BLOCK_M=block_m,
                **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Case(dequant_gemv_kernel, "dequant_gemv",
                _describe(cfg, bits, group_size, symmetric, act, f"BLOCK_M={block_m}"), args, meta)


def _matmul_case(cfg, bits, group_size, symmetric, act=torch.bfloat16):
    M = 512
    x = torch.zeros((M, K), dtype=act)
    packed, scales, zeros = _weight(bits, group_size)
    bias = torch.zeros((N,), dtype=act)
    out = torch.zeros((M, N), dtype=act)
    args = (x, packed, scales, zeros, bias, out, M, N, K, M,
            x.stride(0), x.stride(1), packed.stride(0), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1))
    meta = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=True,
                **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Case(dequant_matmul_kernel, "dequant_matmul",
                _describe(cfg, bits, group_size, symmetric, act, ""), args, meta)


def _describe(cfg, bits, group_size, symmetric, act, extra):
    tiles = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    kind = "sym" if symmetric else "asym"
    act_name = str(act).replace("torch.", "")
    return (f"{extra + ' ' if extra else ''}{tiles} w{cfg.num_warps} s{cfg.num_stages} | "
            f"{bits}b g{group_size} {kind} {act_name}")


def cases() -> list[Case]:
    out = []
    gemv, mm = gemv_configs(interpret=False), matmul_configs(interpret=False)
    for bits, gs in [(4, 128), (3, 32)]:
        for cfg in gemv:
            for block_m in (1, 16):
                out.append(_gemv_case(cfg, bits, gs, False, block_m))
        for cfg in mm:
            out.append(_matmul_case(cfg, bits, gs, False))
    for block_m in (1, 16):
        out.append(_gemv_case(gemv[0], 8, 128, True, block_m))
        out.append(_gemv_case(gemv[0], 4, -1, True, block_m))
    out.append(_matmul_case(mm[0], 8, 128, True))
    out.append(_matmul_case(mm[0], 4, -1, True))
    # fp32 activations (ieee fp32 dot) take only the decode kernel, on the tiles the pruner keeps for them.
    for cfg in fp32_configs(gemv):
        out.append(_gemv_case(cfg, 3, 32, False, 16, act=torch.float32))

    return out
