"""Sparse linear layers: ``y = x @ (W * mask)^T (+ bias)`` for four sparsity patterns.

Shapes and dtypes follow ``nn.Linear``: weight and mask (N, K), x (..., K) with any leading batch dims,
output (..., N). Activations and weights share one dtype, fp16 / bf16 / fp32; products accumulate in
fp32 and the output has the activation dtype; ``bias`` is optional, (N,), in the activation dtype.

Patterns (storage layouts in full, with the reasons: docs/kernels.md):
- Block sparsity (``to_block_sparse``, ``block_sparse_matmul``): ``BlockSparseWeight`` holds only the
  (bn x bk) blocks with a nonzero, bn and bk in {16, 32, 64}, plus BSR indices (``row_ptr``, ``col_idx``).
- N:M (``nm_compress``, ``nm_matmul``): n of every m consecutive inputs kept, (n, m) in {1:4, 2:4, 1:8,
  2:8, 4:8}; ``NMWeight`` holds the kept values (N, Kp*n/m) and log2(m)-bit indices in int32 words.
- Unstructured (``masked_matmul``, or ``to_masked`` + ``packed_masked_matmul``): ``MaskedWeight`` holds
  the dense weight, the mask as 1 bit per weight and the tiles with any kept weight; exact for any mask.
- Activation sparsity for decode, as in TEAL (``activation_sparse_matmul``): features with
  |x| < threshold (or outside a boolean mask) are zeroed and only the weight columns of the kept ones
  are loaded; pass the weight as ``w_t.t()`` of a contiguous (K, N) ``w_t`` for coalesced loads.

Limits: N and K need not be multiples of any block (tails are padded or masked). Every kernel has a
``*_reference`` twin in plain torch with the same signature; the ``*_prune`` helpers return boolean
masks (True = kept) chosen by magnitude. Configs whose shared memory would exceed 64 KiB (gfx942's
per-block limit) are pruned at launch; under ``TRITON_INTERPRET=1`` each factory returns one config.

Imports only torch and triton: copy the file alone.
"""
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_SIZES = (16, 32, 64)
_NM_PATTERNS = {(1, 4), (2, 4), (1, 8), (2, 8), (4, 8)}
_SMEM_BUDGET = 65536  # bytes: gfx942's per-block limit, the smallest of the compile-check targets


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Config factories and pruning
# ----------------------------------------------------------------------------------------------
def block_sparse_configs(interpret: bool | None = None) -> list:
    """Configs for :func:`block_sparse_matmul_kernel`; BLOCK_N/BLOCK_K are the storage block."""
    if _interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    # BLOCK_M 16 serves decode (M <= 16, tl.dot's minimum); larger tiles reuse each block over more rows.
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((16, 4, 4), (32, 4, 4), (64, 4, 3), (128, 8, 3))]


def nm_configs(interpret: bool | None = None) -> list:
    """Configs for :func:`nm_matmul_kernel` (BLOCK_K counts dense input features)."""
    if _interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    # 8 warps, and 2 stages for the decode tile: with 4 warps or more stages some tiles spill on some
    # target (docs/kernels.md, "Tile choices"; the tiles in use: sparse_nm_* rows of results/compile_check.csv).
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((16, 64, 64, 8, 2), (32, 64, 64, 8, 3), (64, 64, 32, 8, 3),
                                     (128, 128, 32, 8, 3))]


def masked_configs(interpret: bool | None = None) -> list:
    """Configs for :func:`masked_matmul_kernel`; BLOCK_N/BLOCK_K are the tile of the tile list."""
    if _interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((16, 4, 4), (32, 4, 3), (64, 4, 3), (128, 8, 2))]


def activation_sparse_configs(interpret: bool | None = None) -> list:
    """Configs for :func:`activation_sparse_matmul_kernel` (BLOCK_K counts kept features)."""
    if _interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    # A GEMV streams W once: small BLOCK_N gives enough programs to fill the GPU at N = 4096
    # (32 -> 128 programs), larger BLOCK_K keeps more loads in flight per program.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4), (128, 64, 8, 3))]


def _smem_bytes(bm: int, bn: int, bk: int, stages: int, elt: int) -> int:
    return max(stages, 1) * (bm * bk + bn * bk) * elt


def prune_tiled_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined x/W tiles would not fit into 64 KiB of shared memory, and at
    decode (M <= 16) every config but the BLOCK_M = 16 ones: a taller tile only multiplies rows that
    do not exist. The BLOCK_M = 16 configs are the decode configs the compile check holds to the
    wide-load rule."""
    elt = named_args["x_ptr"].element_size()
    kept = []
    for c in configs:
        meta = {**kwargs, **c.kwargs}
        if _smem_bytes(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], c.num_stages, elt) <= _SMEM_BUDGET:
            kept.append(c)
    if named_args.get("M", 17) <= 16:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == 16] or kept
    return kept or configs[:1]


# Triton 3.6 fails to compile the N:M kernel's BLOCK_M >= 64 tiles for sm_90 (2:4, bf16: "LLVM ERROR:
# Illegal shared layout" in TritonGPUOptimizeDotOperands), and its autotuner does not skip a config
# that fails that way; 3.7-3.9 compile them. So 3.6 keeps the BLOCK_M <= 32 tiles.
_TRITON_3_6 = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)


def prune_nm_configs(configs, named_args, **kwargs):
    """``prune_tiled_configs``, and under Triton 3.6 only the BLOCK_M <= 32 tiles (see above)."""
    kept = prune_tiled_configs(configs, named_args, **kwargs)
    if _TRITON_3_6:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 32] or kept[:1]
    return kept


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Triton's interpreter (3.6-3.9) multiplies the raw bits of bfloat16 operands in tl.dot; the launcher
    # sets UPCAST_DOT there only. bf16 x bf16 products are exact in fp32, so the result is the same.
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out

@triton.autotune(configs=block_sparse_configs(), key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_tiled_configs})
@triton.jit
def block_sparse_matmul_kernel(
    # pointers: activations, BSR values/row_ptr/col_idx, bias, output
    x_ptr, values_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_om, stride_on,
    # meta: BLOCK_N x BLOCK_K is the storage block
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Block rows on axis 0: the programs of one x tile run together and share it in L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    # a stored block is row-major [BLOCK_N, BLOCK_K]; read it transposed for x @ W^T
    offs_w = offs_k[:, None] + tl.arange(0, BLOCK_N)[None, :] * BLOCK_K  # [BK, BN]
    # int64 loop counter: nnz_blocks * BLOCK_N * BLOCK_K can pass 2**31 for large layers
    start = tl.load(row_ptr_ptr + pid_n).to(tl.int64)
    end = tl.load(row_ptr_ptr + pid_n + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(start, end):
        kb = tl.load(col_idx_ptr + p)
        k = kb * BLOCK_K + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (k[None, :] < K), other=0.0)  # [BM, BK]
        w = tl.load(values_ptr + p * (BLOCK_N * BLOCK_K) + offs_w)  # [BK, BN]
        acc = _dot(x, w, acc, DOT_PRECISION, UPCAST_DOT)
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=nm_configs(), key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_nm_configs})
@triton.jit
def nm_matmul_kernel(
    # pointers: activations, kept values, packed indices, bias, output
    x_ptr, values_ptr, meta_ptr, bias_ptr, out_ptr,
    # sizes: KC = kept values per row (padded K * NN / MM)
    M, N, K, KC,
    # strides
    stride_xm, stride_xk,
    stride_vn, stride_vk,
    stride_metan,
    stride_om, stride_on,
    # meta: NN of every MM kept, IDX_BITS-bit indices, IDX_PER_WORD per int32 word (m = 4; m = 8: planes)
    NN: tl.constexpr, MM: tl.constexpr, IDX_BITS: tl.constexpr, IDX_PER_WORD: tl.constexpr,
    WHOLE_WORDS: tl.constexpr, WORDS64: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    BLOCK_KC: tl.constexpr = BLOCK_K * NN // MM
    GROUPS: tl.constexpr = BLOCK_K // MM
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    pos = tl.reshape(tl.arange(0, MM), (1, 1, 1, MM))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = (k0 // MM) * NN + tl.arange(0, BLOCK_KC)
        mask_v = mask_n[:, None] & (j[None, :] < KC)
        v = tl.load(values_ptr + offs_n[:, None] * stride_vn + j[None, :] * stride_vk,
                    mask=mask_v, other=0.0)  # [BN, BKC]
        if MM == 4 and WORDS64 and BLOCK_KC % (2 * IDX_PER_WORD) == 0:
            # m = 4 with 8-byte aligned rows (an even number of words per row): the tile's indices are
            # whole pairs of words; load each pair as one 64-bit word and unpack it in registers.
            PER64: tl.constexpr = 2 * IDX_PER_WORD
            WORDS: tl.constexpr = BLOCK_KC // PER64
            wj = (k0 // MM) * NN // PER64 + tl.arange(0, WORDS)
            words = tl.load(meta_ptr.to(tl.pointer_type(tl.int64)) + offs_n[:, None] * (stride_metan // 2)
                            + wj[None, :], mask=mask_n[:, None] & (wj[None, :] * PER64 < KC), other=0)
            shifts = tl.reshape(tl.arange(0, PER64).to(tl.int64) * IDX_BITS, (1, 1, PER64))
            idx = tl.reshape(((words[:, :, None] >> shifts) & ((1 << IDX_BITS) - 1)).to(tl.int32),
                             (BLOCK_N, BLOCK_KC))
        elif MM == 4 and WORDS64:
            # m = 4, fewer than 32 indices per tile (1:4, or 2:4 with BLOCK_K = 32): the tile's indices lie
            # in one 64-bit word pair; load it (64 bits: the neighbouring tile's half comes from cache)
            # and unpack the tile's part in registers.
            PER64: tl.constexpr = 2 * IDX_PER_WORD
            j0 = (k0 // MM) * NN
            w64 = tl.load(meta_ptr.to(tl.pointer_type(tl.int64)) + offs_n * (stride_metan // 2) + j0 // PER64,
                          mask=mask_n, other=0)  # [BN]
            part = (w64 >> ((j0 % PER64) * IDX_BITS)).to(tl.int32)  # the tile's BLOCK_KC fields, low bits first
            idx = (part[:, None] >> (tl.arange(0, BLOCK_KC) * IDX_BITS)[None, :]) & ((1 << IDX_BITS) - 1)
        elif WHOLE_WORDS:
            # m = 4: 16 two-bit indices fill a word and a tile's BLOCK_KC indices are whole words (the
            # tile starts at a multiple of 16 kept values): load each word once, unpack in registers.
            WORDS: tl.constexpr = BLOCK_KC // IDX_PER_WORD
            wj = (k0 // MM) * NN // IDX_PER_WORD + tl.arange(0, WORDS)
            words = tl.load(meta_ptr + offs_n[:, None] * stride_metan + wj[None, :],
                            mask=mask_n[:, None] & (wj[None, :] * IDX_PER_WORD < KC), other=0)  # [BN, WORDS]
            shifts = tl.reshape(tl.arange(0, IDX_PER_WORD) * IDX_BITS, (1, 1, IDX_PER_WORD))
            idx = tl.reshape((words[:, :, None] >> shifts) & ((1 << IDX_BITS) - 1), (BLOCK_N, BLOCK_KC))
        elif MM == 4:
            # 1:4 with BLOCK_K = 32: eight 2-bit indices, part of one word; read from its word.
            word = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (j // IDX_PER_WORD)[None, :],
                           mask=mask_v, other=0)
            idx = (word >> ((j % IDX_PER_WORD) * IDX_BITS)[None, :]) & ((1 << IDX_BITS) - 1)
        else:
            # m = 8: 3-bit indices as bit planes, 64 indices per chunk of three 64-bit words (plane p =
            # bit p of each index). The tile's BLOCK_KC <= 32 indices lie in one 32-bit half of its
            # chunk: each row loads the chunk's three words once (64-bit loads; the neighbouring tile
            # reads the other half, from cache) and unpacks its half in registers.
            tl.static_assert(BLOCK_KC <= 32, "an m = 8 tile keeps at most 32 values (half a plane chunk)")
            j0 = (k0 // MM) * NN
            chunk = meta_ptr.to(tl.pointer_type(tl.int64)) + offs_n * (stride_metan // 2) + (j0 // 64) * 3
            half = (j0 % 64) // 32 * 32
            p0 = (tl.load(chunk, mask=mask_n, other=0) >> half).to(tl.int32)  # [BN]
            p1 = (tl.load(chunk + 1, mask=mask_n, other=0) >> half).to(tl.int32)
            p2 = (tl.load(chunk + 2, mask=mask_n, other=0) >> half).to(tl.int32)
            t = (j0 % 32 + tl.arange(0, BLOCK_KC))[None, :]
            idx = (((p0[:, None] >> t) & 1) | (((p1[:, None] >> t) & 1) << 1)
                   | (((p2[:, None] >> t) & 1) << 2))
        # Scatter each kept value to its position in its group: compare against 0..MM-1 and sum over
        # the NN kept slots (at most one matches), which stays in registers.
        v4 = tl.reshape(v, (BLOCK_N, GROUPS, NN, 1))
        i4 = tl.reshape(idx, (BLOCK_N, GROUPS, NN, 1))
        w = tl.sum(tl.where(i4 == pos, v4, 0.0), axis=2)  # [BN, GROUPS, MM]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(v.dtype)
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (k[None, :] < K), other=0.0)  # [BM, BK]
        acc = _dot(x, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=masked_configs(), key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_tiled_configs})
@triton.jit
def masked_matmul_kernel(
    # pointers: activations, dense weight, packed mask bits, tile list, bias, output
    x_ptr, w_ptr, bits_ptr, tile_ptr_ptr, tile_k_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides (bits: int32 words along K, row stride stride_bitsn)
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_bitsn,
    stride_om, stride_on,
    # meta: BLOCK_N x BLOCK_K is the tile of the tile list; WORDS64: rows of bits are 8-byte aligned
    WORDS64: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    start = tl.load(tile_ptr_ptr + pid_n)
    end = tl.load(tile_ptr_ptr + pid_n + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(start, end):
        kt = tl.load(tile_k_ptr + p)  # the tile's column number
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_w = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :] * stride_wk,
                    mask=mask_w, other=0.0)  # [BN, BK]
        # the tile's mask bits: each word loaded once per row, unpacked in registers
        if BLOCK_K >= 64 and WORDS64:  # whole 64-bit words (rows hold an even number of int32 words)
            W64: tl.constexpr = BLOCK_K // 64
            wk = kt * W64 + tl.arange(0, W64)
            words = tl.load(bits_ptr.to(tl.pointer_type(tl.int64)) + offs_n[:, None] * (stride_bitsn // 2)
                            + wk[None, :], mask=mask_n[:, None] & (wk[None, :] * 64 < K), other=0)  # [BN, W64]
            bit = (words[:, :, None] >> tl.reshape(tl.arange(0, 64).to(tl.int64), (1, 1, 64))) & 1
            keep = tl.reshape(bit, (BLOCK_N, BLOCK_K)) != 0
        elif BLOCK_K > 32:
            WORDS: tl.constexpr = BLOCK_K // 32
            wk = kt * WORDS + tl.arange(0, WORDS)
            words = tl.load(bits_ptr + offs_n[:, None] * stride_bitsn + wk[None, :],
                            mask=mask_n[:, None] & (wk[None, :] * 32 < K), other=0)  # [BN, WORDS]
            bit = (words[:, :, None] >> tl.reshape(tl.arange(0, 32), (1, 1, 32))) & 1
            keep = tl.reshape(bit, (BLOCK_N, BLOCK_K)) != 0
        else:  # a 16- or 32-wide tile lies inside one word
            word = tl.load(bits_ptr + offs_n * stride_bitsn + (kt * BLOCK_K) // 32,
                           mask=mask_n, other=0)  # [BN]
            keep = ((word[:, None] >> (k % 32)[None, :]) & 1) != 0
        w = tl.where(keep, w, 0.0)
        acc = _dot(x, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=activation_sparse_configs(), key=["N", "BLOCK_M"])
@triton.jit
def activation_sparse_matmul_kernel(
    # pointers: sparsified activations, weight (read as W^T[k, n]), kept-feature list and count, bias, out
    x_ptr, w_ptr, idx_ptr, count_ptr, bias_ptr, out_ptr,
    # sizes
    M, N,
    # strides (weight given as W^T: stride_wk along input features, stride_wn along outputs)
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_om, stride_on,
    # meta: BLOCK_M == 1 is the GEMV path (no tensor cores); BLOCK_M >= 16 uses tl.dot
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # the count lives on the device so building the list never waits for the host
    n_kept = tl.load(count_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, n_kept, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < n_kept
        kidx = tl.load(idx_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kidx[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + kidx[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_j[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(x).to(tl.float32) * w.to(tl.float32), axis=0)[None, :]
        else:
            acc = _dot(x, w, acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# True when the kernels above were defined under TRITON_INTERPRET=1 (Triton reads it when each
# ``@triton.jit`` runs, so setting it after this module is imported changes nothing).
_INTERPRETED = not isinstance(block_sparse_matmul_kernel.fn, triton.runtime.JITFunction)  # .fn: under autotune
# What a CPU caller can use instead (named in _check_launchable's error).
_CPU_ALTERNATIVES = ("SparseLinear (triton_kernels.nn; its CPU backends run torch's kernels), "
                     "or the matching *_reference (pure torch)")


def _check_launchable(x: torch.Tensor, fn: str) -> None:
    """A clear error for CPU tensors without the interpreter (Triton's own: "0 active drivers")."""
    if x.device.type != "cpu" or _INTERPRETED:
        return
    late = (" (TRITON_INTERPRET=1 is set now, but was not when this module was imported)"
            if os.environ.get("TRITON_INTERPRET") == "1" else "")
    raise RuntimeError(
        f"{fn}: x is a CPU tensor, and the Triton kernels need a CUDA/ROCm GPU. Move the tensors to "
        f"the GPU, or set TRITON_INTERPRET=1 before this module is imported to run the kernels in "
        f"Triton's interpreter on CPU (slow: for tests){late}. For CPU inference use {_CPU_ALTERNATIVES}.")


def _dot_meta(dtype: torch.dtype) -> dict:
    # fp32 layers are used to measure accuracy: keep them ieee rather than tf32 (fp16/bf16 ignore it)
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST_DOT": _interpreting() and dtype == torch.bfloat16}


def _check_inputs(x, K: int, N: int, w_dtype: torch.dtype, w_device: torch.device, bias, out, w_name: str):
    """Validate x/bias/out against a weight of shape (N, K); return (x as (M, K), out as (M, N))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., K={K}) to match {w_name}, got {tuple(x.shape)}")
    if x.dtype != w_dtype:
        raise TypeError(f"x has dtype {x.dtype} but {w_name} has {w_dtype}; cast one so they match")
    if x.device != w_device:
        raise ValueError(f"x is on {x.device} but {w_name} is on {w_device}; move them to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (N,):
            raise ValueError(f"bias must be a tensor of shape ({N},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if out is None:
        out2 = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    else:
        if out.shape != (*lead, N) or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} of shape {(*lead, N)} on {x.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        out2 = out.view(-1, N)  # a view, so the kernel writes into the caller's buffer
    return x2, out2, lead


def block_sparse_matmul(x, bsw, bias=None, *, out=None):
    """``x @ bsw.to_dense()^T (+ bias)`` visiting only the stored blocks. Returns (..., N)."""
    if not isinstance(bsw, BlockSparseWeight):
        raise TypeError(f"bsw must be a BlockSparseWeight (from to_block_sparse), got {type(bsw).__name__}")
    N, K = bsw.shape
    x2, out2, lead = _check_inputs(x, K, N, bsw.values.dtype, bsw.values.device, bias, out, "bsw")
    _check_launchable(x, "block_sparse_matmul")
    M = x2.shape[0]
    bn, bk = bsw.block
    grid = lambda META: (triton.cdiv(N, bn), triton.cdiv(M, META["BLOCK_M"]))  # noqa: E731
    block_sparse_matmul_kernel[grid](
        x2, bsw.values, bsw.row_ptr, bsw.col_idx, bias if bias is not None else x2, out2,
        M, N, K, x2.stride(0), x2.stride(1), out2.stride(0), out2.stride(1),
        HAS_BIAS=bias is not None, **_dot_meta(x.dtype), BLOCK_N=bn, BLOCK_K=bk)
    return out2.view(*lead, N) if out is None else out


def words64(words: torch.Tensor) -> bool:
    """Whether int32 words (rows, n) can be read as 64-bit pairs: every row starts 8-byte aligned
    and holds an even number of words (so a pair never straddles two rows)."""
    return (words.dim() == 2 and words.shape[1] % 2 == 0 and words.stride(1) == 1
            and (words.shape[0] <= 1 or words.stride(0) % 2 == 0) and words.data_ptr() % 8 == 0)


@functools.lru_cache(maxsize=None)
def nm_whole_words(n: int, m: int) -> bool:
    """Whether every N:M config's tile of indices is whole int32 words (``nm_matmul_kernel``'s word
    path): the indices fill the word exactly (2 bits, m = 4) and every BLOCK_K keeps a multiple of
    ``32 // bits`` values. Cached: the launcher asks on every call."""
    bits = nm_index_bits(m)
    per_word = 32 // bits
    return per_word * bits == 32 and all(c.kwargs["BLOCK_K"] * n // m % per_word == 0
                                         for c in nm_configs(False) + nm_configs(True))


def nm_matmul(x, nmw, bias=None, *, out=None):
    """``x @ nmw.to_dense()^T (+ bias)`` decompressing N:M weights in the kernel. Returns (..., N)."""
    if not isinstance(nmw, NMWeight):
        raise TypeError(f"nmw must be an NMWeight (from nm_compress), got {type(nmw).__name__}")
    N, K = nmw.shape
    x2, out2, lead = _check_inputs(x, K, N, nmw.values.dtype, nmw.values.device, bias, out, "nmw")
    _check_launchable(x, "nm_matmul")
    M = x2.shape[0]
    bits = nm_index_bits(nmw.m)
    meta = nmw.meta
    if nmw.m == 8 and not words64(meta):
        meta = meta.clone()  # the plane words are read 64 bits wide: a fresh, 8-byte aligned copy
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(M, META["BLOCK_M"]))  # noqa: E731
    nm_matmul_kernel[grid](
        x2, nmw.values, meta, bias if bias is not None else x2, out2,
        M, N, K, nmw.values.shape[1],
        x2.stride(0), x2.stride(1), nmw.values.stride(0), nmw.values.stride(1), meta.stride(0),
        out2.stride(0), out2.stride(1),
        NN=nmw.n, MM=nmw.m, IDX_BITS=bits, IDX_PER_WORD=32 // bits, WHOLE_WORDS=nm_whole_words(nmw.n, nmw.m),
        WORDS64=words64(meta),
        HAS_BIAS=bias is not None, **_dot_meta(x.dtype))
    return out2.view(*lead, N) if out is None else out


def packed_masked_matmul(x, mw, bias=None, *, out=None):
    """``x @ (W * mask)^T (+ bias)`` from a :class:`MaskedWeight` packed once by :func:`to_masked`."""
    if not isinstance(mw, MaskedWeight):
        raise TypeError(f"mw must be a MaskedWeight (from to_masked), got {type(mw).__name__}")
    N, K = mw.shape
    x2, out2, lead = _check_inputs(x, K, N, mw.weight.dtype, mw.weight.device, bias, out, "mw")
    _check_launchable(x, "packed_masked_matmul")
    M = x2.shape[0]
    tn, tk = mw.tile
    grid = lambda META: (triton.cdiv(N, tn), triton.cdiv(M, META["BLOCK_M"]))  # noqa: E731
    masked_matmul_kernel[grid](
        x2, mw.weight, mw.bits, mw.tile_ptr, mw.tile_k, bias if bias is not None else x2, out2,
        M, N, K, x2.stride(0), x2.stride(1), mw.weight.stride(0), mw.weight.stride(1), mw.bits.stride(0),
        out2.stride(0), out2.stride(1), WORDS64=words64(mw.bits),
        HAS_BIAS=bias is not None, **_dot_meta(x.dtype), BLOCK_N=tn, BLOCK_K=tk)
    return out2.view(*lead, N) if out is None else out


def masked_matmul(x, weight, mask, bias=None, *, out=None):
    """``x @ (weight * mask)^T (+ bias)``, exact for any boolean mask (N, K); packs the mask per call."""
    return packed_masked_matmul(x, to_masked(weight, mask), bias, out=out)


def activation_sparse_matmul(x, weight, threshold=None, mask=None, bias=None, *, out=None):
    """``sparsify(x) @ weight^T (+ bias)`` loading only the weight columns of kept features.

    Exactly one of ``threshold`` (keep ``|x| >= threshold``, per element) or ``mask`` (boolean,
    broadcastable to x, True = kept) selects the features. weight is (N, K) with any strides; pass
    ``activation_sparse_weight(w)`` (a (N, K) view of a contiguous (K, N) tensor) for coalesced loads.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (N, K) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    N, K = weight.shape
    x2, out2, lead = _check_inputs(x, K, N, weight.dtype, weight.device, bias, out, "weight")
    _check_launchable(x, "activation_sparse_matmul")
    M = x2.shape[0]
    keep = _activation_keep(x, threshold, mask).reshape(-1, K)
    xs = torch.where(keep, x2, torch.zeros((), dtype=x.dtype, device=x.device))
    union = keep.any(dim=0)
    # kept features first, in order, without a host sync (nonzero() would wait for the GPU)
    idx = torch.argsort((~union).to(torch.uint8), stable=True).to(torch.int32)
    count = union.sum(dtype=torch.int32).reshape(1)
    block_m = 1 if M == 1 else 16
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(M, META["BLOCK_M"]))  # noqa: E731
    activation_sparse_matmul_kernel[grid](
        xs, weight, idx, count, bias if bias is not None else xs, out2,
        M, N, xs.stride(0), xs.stride(1), weight.stride(1), weight.stride(0), out2.stride(0), out2.stride(1),
        HAS_BIAS=bias is not None, **_dot_meta(x.dtype), BLOCK_M=block_m)
    return out2.view(*lead, N) if out is None else out


# ----------------------------------------------------------------------------------------------
# Pure-torch references (same signatures)
# ----------------------------------------------------------------------------------------------
def _linear_reference(x, w, bias, out):
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def block_sparse_matmul_reference(x, bsw, bias=None, *, out=None):
    return _linear_reference(x, bsw.to_dense(), bias, out)


def nm_matmul_reference(x, nmw, bias=None, *, out=None):
    return _linear_reference(x, nmw.to_dense(), bias, out)


def masked_matmul_reference(x, weight, mask, bias=None, *, out=None):
    return _linear_reference(x, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)), bias, out)


def packed_masked_matmul_reference(x, mw, bias=None, *, out=None):
    return _linear_reference(x, mw.to_dense(), bias, out)


def activation_sparse_matmul_reference(x, weight, threshold=None, mask=None, bias=None, *, out=None):
    keep = _activation_keep(x, threshold, mask)
    return _linear_reference(torch.where(keep, x, torch.zeros((), dtype=x.dtype)), weight, bias, out)


# ----------------------------------------------------------------------------------------------
# Storage containers, compress and prune helpers
# ----------------------------------------------------------------------------------------------
def check_weight(weight, name="weight"):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {weight.dtype}")


def check_mask(mask, weight, name="mask"):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True = kept), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name} must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name} is on {mask.device} but weight is on {weight.device}")


def _check_block(block, name="block"):
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(b not in _BLOCK_SIZES for b in block)):
        raise ValueError(f"{name} must be (rows, cols) with each of {_BLOCK_SIZES}, got {block!r}")
    return int(block[0]), int(block[1])


def check_sparsity(sparsity):
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity!r}")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pad2(w, rows: int, cols: int):
    return torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))


@dataclasses.dataclass
class BlockSparseWeight:
    """BSR storage of an (N, K) weight in (bn x bk) blocks; see the module docstring for the layout."""
    values: torch.Tensor   # (nnz_blocks, bn, bk), weight dtype, contiguous
    row_ptr: torch.Tensor  # (ceil(N/bn) + 1,) int32
    col_idx: torch.Tensor  # (nnz_blocks,) int32
    shape: tuple           # (N, K)
    block: tuple           # (bn, bk)

    def memory_bytes(self) -> int:
        """Bytes of values + row_ptr + col_idx (the zero padding inside edge blocks is counted)."""
        return _nbytes(self.values, self.row_ptr, self.col_idx)

    @property
    def block_density(self) -> float:
        nbr, nbc = -(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1])
        return self.values.shape[0] / max(nbr * nbc, 1)

    def to_dense(self) -> torch.Tensor:
        (N, K), (bn, bk) = self.shape, self.block
        nbr, nbc = -(-N // bn), -(-K // bk)
        rows = torch.repeat_interleave(torch.arange(nbr, device=self.values.device),
                                       (self.row_ptr[1:] - self.row_ptr[:-1]).long())
        blocks = torch.zeros(nbr, nbc, bn, bk, dtype=self.values.dtype, device=self.values.device)
        blocks[rows, self.col_idx.long()] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(nbr * bn, nbc * bk)[:N, :K].contiguous()


def to_block_sparse(weight, block=(32, 32)) -> BlockSparseWeight:
    """Store the (bn x bk) blocks of ``weight`` (N, K) that hold any nonzero (NaN counts as nonzero)."""
    check_weight(weight)
    bn, bk = _check_block(block)
    N, K = weight.shape
    nbr, nbc = -(-N // bn), -(-K // bk)
    blocks = pad2(weight, nbr * bn, nbc * bk).reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)
    keep = (blocks != 0).any(dim=-1).any(dim=-1)  # [nbr, nbc]
    values = blocks[keep].contiguous()  # row-major over (block row, block col): BSR order
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = keep.sum(dim=1).cumsum(0)
    col_idx = keep.nonzero()[:, 1].to(torch.int32)
    return BlockSparseWeight(values, row_ptr, col_idx, (N, K), (bn, bk))


def nm_index_bits(m: int) -> int:
    """Bits per stored N:M index: 2 for m = 4, 3 for m = 8."""
    return 2 if m == 4 else 3


def _check_nm(n, m):
    if (n, m) not in _NM_PATTERNS:
        raise ValueError(f"(n, m) must be one of {sorted(_NM_PATTERNS)}, got ({n!r}, {m!r})")


@dataclasses.dataclass
class NMWeight:
    """N:M compressed (N, K) weight; see the module docstring for the layout."""
    values: torch.Tensor  # (N, Kp*n/m) kept values, weight dtype
    meta: torch.Tensor    # int32 in-group positions: m=4 (N, ceil(KC/16)); m=8 bit planes (N, 6*ceil(KC/64))
    shape: tuple          # (N, K), K before padding to a multiple of m
    n: int
    m: int

    def memory_bytes(self) -> int:
        """Bytes of kept values + packed index words (the zero-padded last group is counted)."""
        return _nbytes(self.values, self.meta)

    def indices(self) -> torch.Tensor:
        """The unpacked in-group positions, (N, Kp*n/m) int64."""
        KC = self.values.shape[1]
        j = torch.arange(KC, device=self.meta.device)
        words = self.meta.long() & 0xFFFFFFFF
        if self.m == 8:  # bit planes: int32 word 6c + 2p (+1 for indices 32..63 of the chunk) holds bit p
            word = (j // 64) * 6 + (j % 64) // 32
            return sum(((words[:, word + 2 * p] >> (j % 32)) & 1) << p for p in range(3))
        return (words[:, j // 16] >> ((j % 16) * 2)) & 3

    def to_dense(self) -> torch.Tensor:
        N, K = self.shape
        groups = self.values.shape[1] // self.n
        dense = torch.zeros(N, groups, self.m, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(2, self.indices().reshape(N, groups, self.n), self.values.reshape(N, groups, self.n))
        return dense.reshape(N, groups * self.m)[:, :K].contiguous()


def nm_compress(weight, n=2, m=4) -> NMWeight:
    """Compress a weight that already has at most n nonzeros in every group of m along K.

    K not divisible by m is zero-padded to the next multiple. A group with more than n nonzeros raises
    ValueError (prune first with :func:`nm_prune`); groups with fewer keep explicit zeros.
    """
    check_weight(weight)
    _check_nm(n, m)
    N, K = weight.shape
    Kp = -(-K // m) * m
    g = pad2(weight, N, Kp).reshape(N, Kp // m, m)
    nz = g != 0
    counts = nz.sum(-1)
    if bool((counts > n).any()):
        r, c = (counts > n).nonzero()[0].tolist()
        raise ValueError(f"weight is not {n}:{m} sparse: row {r}, columns {c * m}..{c * m + m - 1} hold "
                         f"{int(counts[r, c])} nonzeros (at most {n} allowed); prune with nm_prune first")
    pos = torch.arange(m, device=weight.device)
    # nonzeros first, then zeros to fill n slots; positions ascending inside the kept set
    order = torch.argsort((~nz).to(torch.int64) * m + pos, dim=-1)[..., :n]
    idx = order.sort(dim=-1).values
    values = torch.gather(g, 2, idx).reshape(N, -1).contiguous()
    return NMWeight(values, _pack_nm_indices(idx.reshape(N, -1), m), (N, K), n, m)


def _words32(fields: torch.Tensor, width: int) -> torch.Tensor:
    """int64 fields (N, W, 32 // width), each < 2**width -> int32 words (N, W), field i at bit i * width."""
    packed = (fields << (torch.arange(fields.shape[-1], device=fields.device) * width)).sum(-1)  # < 2**32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def nm_meta_words(kept: int, m: int) -> int:
    """int32 index words per row of :class:`NMWeight` for ``kept`` values per row (module docstring)."""
    return -(-kept // 16) if m == 4 else 6 * -(-kept // 64)


def _pack_nm_indices(flat: torch.Tensor, m: int) -> torch.Tensor:
    """In-group positions (N, KC) -> the int32 index words of :class:`NMWeight` (module docstring)."""
    N, KC = flat.shape
    words = nm_meta_words(KC, m)
    if m == 4:  # sixteen 2-bit fields per word
        return _words32(torch.nn.functional.pad(flat, (0, words * 16 - KC)).reshape(N, words, 16), 2).contiguous()
    # m = 8: chunks of 64 indices, each three 64-bit plane words stored as int32 (low, high) pairs
    chunks = words // 6
    f = torch.nn.functional.pad(flat, (0, chunks * 64 - KC)).reshape(N, chunks, 1, 2, 32)
    planes = (f >> torch.arange(3, device=flat.device).reshape(1, 1, 3, 1, 1)) & 1  # [N, chunks, 3, 2, 32]
    return _words32(planes, 1).reshape(N, chunks * 6).contiguous()


@dataclasses.dataclass
class MaskedWeight:
    """Dense weight + 1-bit mask + list of tiles holding any kept weight; see the module docstring."""
    weight: torch.Tensor    # (N, K), values outside the mask are ignored
    bits: torch.Tensor      # (N, ceil(K/32)) int32, bit k % 32 of word k // 32 = mask[:, k]
    tile_ptr: torch.Tensor  # (ceil(N/tile_n) + 1,) int32
    tile_k: torch.Tensor    # (nnz_tiles,) int32 tile-column numbers
    shape: tuple            # (N, K)
    tile: tuple             # (tile_n, tile_k)

    def memory_bytes(self) -> int:
        """Bytes of dense weight + mask bits + tile list."""
        return _nbytes(self.weight, self.bits, self.tile_ptr, self.tile_k)

    def mask(self) -> torch.Tensor:
        K = self.shape[1]
        k = torch.arange(K, device=self.bits.device)
        return ((self.bits.long()[:, k // 32] >> (k % 32)) & 1).bool()

    def to_dense(self) -> torch.Tensor:
        return torch.where(self.mask(), self.weight, torch.zeros((), dtype=self.weight.dtype))


def pack_mask_bits(mask) -> torch.Tensor:
    """Boolean (N, K) -> int32 (N, ceil(K/32)), bit k % 32 of word k // 32."""
    N, K = mask.shape
    words = -(-K // 32)
    b = torch.nn.functional.pad(mask.to(torch.int64), (0, words * 32 - K)).reshape(N, words, 32)
    return _words32(b, 1).contiguous()


def to_masked(weight, mask, tile=(64, 64)) -> MaskedWeight:
    """Pack ``mask`` to bits and list the (tile_n x tile_k) tiles of ``weight`` with any kept entry."""
    check_weight(weight)
    check_mask(mask, weight)
    tn, tk = _check_block(tile, "tile")
    N, K = weight.shape
    ntr, ntc = -(-N // tn), -(-K // tk)
    t = pad2(mask, ntr * tn, ntc * tk).reshape(ntr, tn, ntc, tk)
    keep = t.any(dim=3).any(dim=1)  # [ntr, ntc]
    tile_ptr = torch.zeros(ntr + 1, dtype=torch.int32, device=weight.device)
    tile_ptr[1:] = keep.sum(dim=1).cumsum(0)
    tile_k = keep.nonzero()[:, 1].to(torch.int32)
    return MaskedWeight(weight, pack_mask_bits(mask), tile_ptr, tile_k, (N, K), (tn, tk))


def activation_sparse_weight(weight) -> torch.Tensor:
    """An (N, K) view of a contiguous (K, N) copy: gathered input features become contiguous rows."""
    check_weight(weight)
    return weight.t().contiguous().t()


def _activation_keep(x, threshold, mask):
    if (threshold is None) == (mask is None):
        raise ValueError("give exactly one of threshold (keep |x| >= threshold) or mask (boolean, True = kept)")
    if threshold is not None:
        if isinstance(threshold, torch.Tensor):
            if threshold.numel() != 1:
                raise ValueError(f"threshold must be a scalar, got shape {tuple(threshold.shape)}")
            value = float(threshold) if threshold.device.type == "cpu" else 0.0  # no host sync on a GPU
        elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        else:
            value = threshold
        if not 0 <= value < float("inf"):  # NaN would drop every feature, a negative one none
            raise ValueError(f"threshold must be a finite number >= 0, got {value!r}")
        return (x.abs() >= threshold) | torch.isnan(x)  # NaN features stay (NaN output, as in a dense matmul)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a boolean tensor broadcastable to x (True = kept)")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    try:
        return mask.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}") from None


def magnitude_prune(weight, sparsity) -> torch.Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * numel)`` largest-|w| entries (ties by position)."""
    check_weight(weight)
    check_sparsity(sparsity)
    keep = round((1.0 - sparsity) * weight.numel())
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        mask[torch.topk(weight.detach().abs().float().flatten(), keep).indices] = True
    return mask.reshape(weight.shape)


def nm_prune(weight, n=2, m=4) -> torch.Tensor:
    """Boolean mask keeping the n largest-|w| of every m consecutive input features (last group padded)."""
    check_weight(weight)
    _check_nm(n, m)
    N, K = weight.shape
    Kp = -(-K // m) * m
    g = pad2(weight.detach().abs().float(), N, Kp).reshape(N, Kp // m, m)
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(2, torch.topk(g, n, dim=-1).indices, True)
    return mask.reshape(N, Kp)[:, :K].contiguous()


def block_prune(weight, block=(32, 32), sparsity=0.5) -> torch.Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * blocks)`` blocks of largest L2 norm."""
    check_weight(weight)
    bn, bk = _check_block(block)
    check_sparsity(sparsity)
    N, K = weight.shape
    nbr, nbc = -(-N // bn), -(-K // bk)
    norms = pad2(weight.detach().float(), nbr * bn, nbc * bk).reshape(nbr, bn, nbc, bk).pow(2).sum((1, 3))
    keep = round((1.0 - sparsity) * norms.numel())
    kb = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        kb[torch.topk(norms.flatten(), keep).indices] = True
    kb = kb.reshape(nbr, 1, nbc, 1).expand(nbr, bn, nbc, bk).reshape(nbr * bn, nbc * bk)
    return kb[:N, :K].contiguous()
