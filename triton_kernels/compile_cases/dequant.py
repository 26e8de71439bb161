"""Compile-check cases for ``triton_kernels.dequant_matmul``.

Every autotune config of the three kernels (decode with direct store, decode with split-K, prefill) on
a representative 4096 x 4096 problem, in the variants that bound the resource use: 4-bit g128 (one
plane, one group per tile) and 3-bit g32 (a 2-bit and a 1-bit plane, several groups per tile). A few
more variants on each kernel's first config cover the remaining constexpr branches: 7-bit (three
planes), 8-bit symmetric, per-channel 2-bit, 1-bit groups of 16, fp32 activations.
"""
import torch

from triton_kernels.compile_cases.case import Case, split_plane_args
from triton_kernels.dequant_matmul import (dequant_gemv_kernel, dequant_matmul_kernel, fp32_configs, gemv_configs,
                                           matmul_configs, multirow_configs, plane_args)

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
    out = torch.zeros((M, N), dtype=act)
    ws = torch.zeros((M, N), dtype=torch.float32)
    plane_sizes, plane_meta = split_plane_args(plane_args(K, bits))
    args = (x, packed, scales, zeros, bias, out, ws, M, N, K, *plane_sizes,
            x.stride(0), x.stride(1), packed.stride(0), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), out.stride(0), ws.stride(0))
    meta = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=True, BLOCK_M=block_m, **plane_meta,
                **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = "dequant_gemv_splitk" if cfg.kwargs["SPLIT_K"] > 1 else "dequant_gemv"
    # Decode configs must fetch the packed words >= 64 bits at a time; fp32 activations run their own
    # small tiles (fp32_configs), a correctness path the rule does not cover.
    return Case(dequant_gemv_kernel, name,
                _describe(cfg, bits, group_size, symmetric, act, f"BLOCK_M={block_m}"), args, meta,
                weight_args=(1,), wide_loads=act != torch.float32)


def _matmul_case(cfg, bits, group_size, symmetric, act=torch.bfloat16):
    M = 512
    x = torch.zeros((M, K), dtype=act)
    packed, scales, zeros = _weight(bits, group_size)
    bias = torch.zeros((N,), dtype=act)
    out = torch.zeros((M, N), dtype=act)
    plane_sizes, plane_meta = split_plane_args(plane_args(K, bits))
    args = (x, packed, scales, zeros, bias, out, M, N, K, M, *plane_sizes,
            x.stride(0), x.stride(1), packed.stride(0), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1))
    meta = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=True, **plane_meta,
                **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Case(dequant_matmul_kernel, "dequant_matmul",
                _describe(cfg, bits, group_size, symmetric, act, ""), args, meta, weight_args=(1,))


def _describe(cfg, bits, group_size, symmetric, act, extra):
    tiles = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    kind = "sym" if symmetric else "asym"
    act_name = str(act).replace("torch.", "")
    return (f"{extra + ' ' if extra else ''}{tiles} w{cfg.num_warps} s{cfg.num_stages} | "
            f"{bits}b g{group_size} {kind} {act_name}")


def cases() -> list[Case]:
    out = []
    direct, split = gemv_configs(interpret=False), gemv_configs(interpret=False, split=True)
    mm = matmul_configs(interpret=False)
    for bits, gs in [(4, 128), (3, 32)]:
        for cfg in direct:
            out.append(_gemv_case(cfg, bits, gs, False, 1))
        for cfg in multirow_configs() + multirow_configs(split=True):
            out.append(_gemv_case(cfg, bits, gs, False, 16))
        for cfg in mm:
            out.append(_matmul_case(cfg, bits, gs, False))
    for cfg in split:
        out.append(_gemv_case(cfg, 4, 128, False, 1))
    for bits, gs, sym in [(7, 128, False), (8, 128, True), (2, -1, True), (1, 16, False)]:
        out.append(_gemv_case(direct[0], bits, gs, sym, 1))
        out.append(_gemv_case(multirow_configs()[0], bits, gs, sym, 16))
        out.append(_matmul_case(mm[0], bits, gs, sym))
    # fp32 activations (ieee fp32 dot) take only the decode kernel, on the tiles the pruner swaps in for them.
    for cfg in fp32_configs() + fp32_configs(split=True):
        out.append(_gemv_case(cfg, 3, 32, False, 16, act=torch.float32))
    return out
