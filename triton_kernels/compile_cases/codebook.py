"""Compile-check cases for ``triton_kernels.codebook_matmul``.

Every autotune config of the three kernels (decode with direct store, decode with split-K, prefill) on
a representative 4096 x 4096 problem, in the variants that bound the resource use: 4-bit per-row
tables with g128 scales (the ``gather`` lookup on a [BLOCK_N, 16] tile, one plane) and 3-bit shared
table with g32 scales (``gather`` on 8 entries, two planes, several groups per tile). A few more
variants on each kernel's first config cover the other lookups and constexpr branches: 2-bit
``select`` per-row without scales, 1-bit ``select`` shared per-channel, 5-bit ``gather`` (32
entries, two planes); the ``load`` lookup (8-bit per-row g128, 7-bit per-row g128, 6-bit shared
g32) on its own decode and prefill tiles (``load_configs``, ``load_matmul_configs``; all of them for
8-bit); fp32 activations (4-bit, 8-bit). The cases follow the installed Triton: from 3.8 on, 3-5 bits
take the load lookup and its tiles (``codebook_matmul.GATHER_SHUFFLES``). Compiled for sm_80 and sm_90
only (``TARGETS``).
"""
import torch

from triton_kernels.codebook_matmul import (codebook_gemv_kernel, codebook_matmul_kernel, fp32_configs,
                                            gemv_configs, load_configs, load_matmul_configs, lookup_mode,
                                            matmul_configs, multirow_configs, plane_args, planes)
from triton_kernels.compile_cases.case import Case, split_plane_args

N = K = 4096
# NVIDIA only: on gfx942 (Triton 3.7.1) tl.gather failed to compile for some layouts ("PassManager::run
# failed": 16x512 decode with a shared 8-entry table, the fp32 16x64 tile) and the multirow tile's
# shared memory (76 KiB) is over the 64 KiB limit; AMD is not a supported target of this kernel yet.
TARGETS = ("sm_80", "sm_90")


def _weight(bits: int, group_size: int, shared: bool, has_scales: bool):
    words = (K * bits + 31) // 32
    groups = 1 if group_size == -1 else (K + group_size - 1) // group_size
    packed = torch.zeros((N, words), dtype=torch.int32)
    codebook = torch.zeros((1 if shared else N, 2 ** bits), dtype=torch.float16)
    scales = torch.ones((N, groups), dtype=torch.float16) if has_scales else None
    return packed, codebook, scales


def _common(bits, group_size, shared, has_scales, codebook, scales):
    """The launcher's table/scale arguments: (args after the out pointers' strides, constexprs)."""
    stride_codebook_n = 0 if shared else codebook.stride(0)
    stride_scales_n, stride_scales_g = (scales.stride(0), scales.stride(1)) if scales is not None else (0, 0)
    meta = dict(BITS=bits, GROUP_SIZE=group_size, HAS_SCALES=has_scales, SHARED_TABLE=shared,
                LOOKUP=lookup_mode(bits), HAS_BIAS=True)
    return (stride_codebook_n, codebook.stride(1), stride_scales_n, stride_scales_g), meta


def _gemv_case(cfg, bits, group_size, shared, has_scales, block_m, act=torch.bfloat16):
    M = block_m
    x = torch.zeros((M, K), dtype=act)
    packed, codebook, scales = _weight(bits, group_size, shared, has_scales)
    bias = torch.zeros((N,), dtype=act)
    out = torch.zeros((M, N), dtype=act)
    ws = torch.zeros((M, N), dtype=torch.float32)
    plane_sizes, plane_meta = split_plane_args(plane_args(K, bits))
    strides, meta = _common(bits, group_size, shared, has_scales, codebook, scales)
    args = (x, packed, codebook, scales if scales is not None else codebook, bias, out, ws, M, N, K, *plane_sizes,
            x.stride(0), x.stride(1), packed.stride(0), *strides, out.stride(0), ws.stride(0))
    meta.update(BLOCK_M=block_m, **plane_meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = "codebook_gemv_splitk" if cfg.kwargs["SPLIT_K"] > 1 else "codebook_gemv"
    # Decode configs must fetch the packed words >= 64 bits at a time; fp32 activations run their own
    # small tiles (fp32_configs), a correctness path the rule does not cover; so does the load lookup's
    # 16-row tile for codes with a 1-bit plane (256 words for 256 threads; wider tiles spill, see
    # load_configs), marked in the config column.
    one_bit_plane = meta["LOOKUP"] == "load" and block_m > 1 and 1 in planes(bits) and act != torch.float32
    extra = " (1-bit plane: 32-bit loads, known)" if one_bit_plane else ""
    return Case(codebook_gemv_kernel, name,
                _describe(cfg, bits, group_size, shared, has_scales, act, f"BLOCK_M={block_m}") + extra, args,
                meta, weight_args=(1,), wide_loads=act != torch.float32 and not one_bit_plane, targets=TARGETS)


def _matmul_case(cfg, bits, group_size, shared, has_scales, act=torch.bfloat16):
    M = 512
    x = torch.zeros((M, K), dtype=act)
    packed, codebook, scales = _weight(bits, group_size, shared, has_scales)
    bias = torch.zeros((N,), dtype=act)
    out = torch.zeros((M, N), dtype=act)
    plane_sizes, plane_meta = split_plane_args(plane_args(K, bits))
    strides, meta = _common(bits, group_size, shared, has_scales, codebook, scales)
    args = (x, packed, codebook, scales if scales is not None else codebook, bias, out, M, N, K, M, *plane_sizes,
            x.stride(0), x.stride(1), packed.stride(0), *strides, out.stride(0), out.stride(1))
    meta.update(**plane_meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Case(codebook_matmul_kernel, "codebook_matmul",
                _describe(cfg, bits, group_size, shared, has_scales, act, ""), args, meta, weight_args=(1,),
                targets=TARGETS)


def _describe(cfg, bits, group_size, shared, has_scales, act, extra):
    tiles = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    table = "shared" if shared else "per-row"
    scale = f"g{group_size}" if has_scales else "no-scales"
    act_name = str(act).replace("torch.", "")
    return (f"{extra + ' ' if extra else ''}{tiles} w{cfg.num_warps} s{cfg.num_stages} | "
            f"{bits}b {lookup_mode(bits)} {table} {scale} {act_name}")


def cases() -> list[Case]:
    out = []
    # The tiles the pruners run for the installed Triton's lookup at 3-5 bits ("load" where tl.gather
    # does not lower to shuffles: Triton >= 3.8, see codebook_matmul.GATHER_SHUFFLES).
    if lookup_mode(4) == "gather":
        direct, split = gemv_configs(interpret=False), gemv_configs(interpret=False, split=True)
        multirow, multirow_split = multirow_configs(), multirow_configs(split=True)
        mm = matmul_configs(interpret=False)
    else:
        direct, split = load_configs(), load_configs(split=True)
        multirow, multirow_split = load_configs(multirow=True), load_configs(split=True, multirow=True)
        mm = load_matmul_configs()
    for bits, gs, shared in [(4, 128, False), (3, 32, True)]:
        for cfg in direct:
            out.append(_gemv_case(cfg, bits, gs, shared, True, 1))
        for cfg in multirow + multirow_split:
            out.append(_gemv_case(cfg, bits, gs, shared, True, 16))
        for cfg in mm:
            out.append(_matmul_case(cfg, bits, gs, shared, True))
    for cfg in split:
        out.append(_gemv_case(cfg, 4, 128, False, True, 1))
    for bits, gs, shared, has_scales in [(2, -1, False, False), (1, -1, True, True), (5, 64, False, True)]:
        load = lookup_mode(bits) == "load"
        out.append(_gemv_case((load_configs() if load else gemv_configs(interpret=False))[0],
                              bits, gs, shared, has_scales, 1))
        out.append(_gemv_case((load_configs(multirow=True) if load else multirow_configs())[0],
                              bits, gs, shared, has_scales, 16))
        out.append(_matmul_case(mm[0], bits, gs, shared, has_scales))
    # The "load" lookup (6-8 bits) runs its own decode tiles (load_configs, swapped in by the pruner).
    for bits, gs, shared in [(8, 128, False), (7, 128, False), (6, 32, True)]:
        for cfg in load_configs() + (load_configs(split=True) if bits == 8 else []):
            out.append(_gemv_case(cfg, bits, gs, shared, True, 1))
        for cfg in load_configs(multirow=True) + (load_configs(split=True, multirow=True) if bits == 8 else []):
            out.append(_gemv_case(cfg, bits, gs, shared, True, 16))
        for cfg in load_matmul_configs() if bits == 8 else load_matmul_configs()[:1]:
            out.append(_matmul_case(cfg, bits, gs, shared, True))
    # fp32 activations (ieee fp32 dot) take only the decode kernel, on the tiles the pruner swaps in for them.
    for cfg in fp32_configs() + fp32_configs(split=True):
        out.append(_gemv_case(cfg, 4, 32, False, True, 16, act=torch.float32))
    out.append(_gemv_case(fp32_configs()[0], 8, 128, False, True, 16, act=torch.float32))
    return out
