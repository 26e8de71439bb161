"""Codebook (non-uniform, lookup-table) quantized linear: ``y = x @ W^T (+ bias)``, 1-8-bit codes.

Math: ``W`` (N, K) is stored as codes ``q`` in [0, 2^bits) that index a table of 2^bits values, times an
optional scale per group of ``group_size`` consecutive weights of a row; in fp32, as
``dequantize_codebook`` computes it and bit for bit as both kernels do (one rounding)::

    W[n, k] = codebook[r, q[n, k]].float() * scales[n, k // group_size].float()

with r = n for a per-row table (SqueezeLLM, k-means: codebook (N, 2^bits)) or r = 0 for one shared
table (NF4, FP4: (1, 2^bits)); ``scales=None`` means 1.

Shapes and dtypes:
- ``x`` (..., K) fp16 / bf16 / fp32 -> (..., N) in x's dtype, fp32 accumulation; fp32 x uses ieee dots.
- ``packed`` int32 (N, ceil(K * bits / 32)): ``dequant_matmul``'s bit-plane layout; this file carries its
  own copy of the packing helpers so it can be copied alone (``tests/test_kernel_copies.py``).
- ``codebook`` (N or 1, 2^bits) and ``scales`` (N, ceil(K / group_size)) fp16 / bf16 / fp32; ``bias`` (N,).

Kernels: as ``dequant_matmul`` (decode for M <= 16 and fp32 x, tiled prefill), with a table lookup
in place of the zero point: ``lookup_mode(bits)`` picks ``select`` (1-2 bits), ``gather`` (3-5 bits,
where ``tl.gather`` lowers to warp shuffles) or ``load`` (a global load per weight). Why these and what
they compile to: docs/kernels.md. Limits: the table should be finite (the M == 1 path does not mask
its K padding per weight); K is taken from x; AMD GPUs take the ``load`` lookup, untested on hardware.

Public API: ``codebook_matmul``, ``codebook_matmul_reference``, ``dequantize_codebook``, ``pack``,
``unpack``, ``planes``, ``lookup_mode``. Imports only torch and triton: copy the file alone.
"""
import os

import torch
import triton
import triton.language as tl

SUPPORTED_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 16  # the decode path handles M <= 16 (one 16-row MMA tile at most)


# ----------------------------------------------------------------------------------------------
# Config factories and pruning
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def planes(bits: int) -> tuple[int, ...]:
    """Widths of the power-of-two bit planes a ``bits``-bit code is stored in, low bits first."""
    return {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}[bits]


# tl.gather of the [BLOCK_N, 2^bits] table tile: Triton 3.6 and 3.7 lower it to one warp shuffle per
# weight, Triton 3.9 to a per-thread select chain over every entry, several times the instructions
# (docs/kernels.md, "codebook_matmul"). 3.8 is unchecked.
_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
GATHER_SHUFFLES = _TRITON_VERSION < (3, 8)


def lookup_mode(bits: int, amd: bool = False) -> str:
    """Where the kernels look the table up (module docstring): select / gather / load.

    ``gather`` for 3-5 bits only where it compiles to warp shuffles (``GATHER_SHUFFLES``: Triton 3.6,
    3.7) and not on ROCm (``amd``: Triton 3.7.1 failed to compile ``tl.gather`` for gfx942 in some
    layouts); ``load`` otherwise."""
    if bits <= 2:
        return "select"
    return "gather" if bits <= 5 and GATHER_SHUFFLES and not amd else "load"


def gemv_configs(interpret: bool | None = None, split: bool = False) -> list:
    """Autotune configs of the decode kernel (``split``: the split-K variant); one under the interpreter.

    The uniform kernel's tiles (``dequant_matmul.gemv_configs``: every thread loads >= 2 consecutive
    packed words) less one that spills with a gather table (docs/kernels.md, "Tile choices").
    """
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2 if split else 1},
                              num_warps=4, num_stages=1)]
    out = []
    for bn, bk, warps in [(16, 512, 4), (32, 256, 4), (64, 128, 4), (128, 128, 8)]:
        for sk in ((4,) if split else (1,)):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps,
                                     num_stages=2))
    return out


def matmul_configs(interpret: bool | None = None) -> list:
    """Autotune configs of the prefill (tiled tl.dot) kernel; one small config under the interpreter.

    The uniform kernel's, less one that spills with a per-row gather table (docs/kernels.md)."""
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    out = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 64, 4, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


def fp32_configs(split: bool = False) -> list:
    """Decode configs for fp32 activations with BLOCK_M=16 (swapped in by the pruner): the uniform
    kernel's (an ieee fp32 dot is register-hungry). A correctness path, not a speed one."""
    return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4 if split else 1}, num_warps=8,
                          num_stages=2)]


def multirow_configs(split: bool = False) -> list:
    """Decode configs for 2 <= M <= 16 with fp16/bf16 activations (swapped in by the pruner): the
    uniform kernel's 128x128 / 8 warps / 4 stages tile (see ``dequant_matmul.multirow_configs``)."""
    return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4 if split else 1}, num_warps=8,
                          num_stages=4)]


def load_configs(split: bool = False, multirow: bool = False) -> list:
    """Decode configs for the ``"load"`` lookup (swapped in by the pruner): a gathered global load per
    weight holds a 64-bit address per element, so the uniform tiles run out of registers. These are
    the spill-free ones (docs/kernels.md, "Tile choices"); the 16-row tile loads the 1-bit plane of
    3-, 5- and 7-bit codes 32 bits at a time (marked so in results/compile_check.csv's config column)."""
    sk = 4 if split else 1
    if multirow:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": sk}, num_warps=8, num_stages=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=2)
            for bn, bk in [(16, 512), (32, 256)]]


def _prune_gemv(configs, named_args, **kwargs):
    """Swap in the tiles of the M bucket / activation dtype / lookup, drop K blocks wider than the row
    (beyond 32) and K splits with nothing to do; keep at least one."""
    args = {**named_args, **kwargs}
    K = args["K"]
    if not _interpreting():
        split = configs[0].kwargs["SPLIT_K"] > 1
        if args["BLOCK_M"] > 1 and args["x_ptr"].dtype == torch.float32:
            configs = fp32_configs(split=split)
        elif args["LOOKUP"] == "load":
            configs = load_configs(split=split, multirow=args["BLOCK_M"] > 1)
        elif args["BLOCK_M"] > 1:
            configs = multirow_configs(split=split)
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))
            and c.kwargs["SPLIT_K"] <= triton.cdiv(K, c.kwargs["BLOCK_K"])]
    return kept or configs[-1:]


def load_matmul_configs() -> list:
    """Prefill configs for the ``"load"`` lookup: the 8-warp ones of ``matmul_configs`` (the 4-warp one
    spills with table loads per weight; docs/kernels.md)."""
    return [c for c in matmul_configs(interpret=False) if c.num_warps == 8]


def _prune_matmul(configs, named_args, **kwargs):
    """Swap in the load lookup's tiles; drop tiles taller than the M bucket (pure padding) or wider than
    N / K; keep at least one."""
    args = {**named_args, **kwargs}
    m_bucket, N, K = args["M_BUCKET"], args["N"], args["K"]
    if args["LOOKUP"] == "load" and not _interpreting():
        configs = load_matmul_configs()
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(32, m_bucket)
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# _unpack_words, _plane_codes, _codes_tile, _per_weight, _round_to_bf16 and _dot_acc are copies of
# dequant_matmul's (tests/test_kernel_copies.py checks they are identical).
@triton.jit
def _unpack_words(v, W: tl.constexpr):
    """uint32 words [R, C] of W-bit codes (LSB first) -> codes [R, C * 32 // W] in stream order.

    Each step splits every element into its low and high half and interleaves them, so a word's
    earlier codes (low bits) come first: log2(32 / W) shift/mask/interleave steps in registers.
    """
    if W <= 16:
        v = tl.interleave(v & 0xFFFF, v >> 16)
    if W <= 8:
        v = tl.interleave(v & 0xFF, v >> 8)
    if W <= 4:
        v = tl.interleave(v & 0xF, v >> 4)
    if W <= 2:
        v = tl.interleave(v & 0x3, v >> 2)
    if W <= 1:
        v = tl.interleave(v & 0x1, v >> 1)
    return v


@triton.jit
def _plane_codes(row_ptrs, mask_n, WPR, word0, SHIFT, W: tl.constexpr, BLOCK_K: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Codes [BN, BLOCK_K] of one W-bit plane whose tile starts at bit 32 * word0 + SHIFT of each row."""
    BW: tl.constexpr = BLOCK_K * W // 32
    offs_w = word0 + tl.arange(0, BW)
    ptrs = row_ptrs[:, None] + offs_w[None, :]  # [BN, BW]: contiguous words of each row
    v = tl.load(ptrs, mask=mask_n[:, None] & (offs_w < WPR)[None, :], other=0).to(tl.uint32, bitcast=True)
    if not ALIGNED:
        # The plane starts mid-word (K * lower widths not a multiple of 32): funnel-shift word pairs.
        hi = tl.load(ptrs + 1, mask=mask_n[:, None] & (offs_w + 1 < WPR)[None, :], other=0)
        hi = hi.to(tl.uint32, bitcast=True)
        v = (v >> SHIFT) | ((hi << 1) << (31 - SHIFT))
    return _unpack_words(v, W)


@triton.jit
def _codes_tile(packed_ptr, offs_n, mask_n, stride_packed_n, WPR, kb, P1_WORD0, P1_SHIFT, P2_WORD0, P2_SHIFT,
                W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, BLOCK_K: tl.constexpr,
                ALIGNED: tl.constexpr):
    """uint32 codes [BN, BLOCK_K] of K block ``kb``: the planes' codes, shifted into place and OR-ed."""
    row_ptrs = packed_ptr + offs_n * stride_packed_n
    q = _plane_codes(row_ptrs, mask_n, WPR, kb * (BLOCK_K * W0 // 32), 0, W0, BLOCK_K, True)
    if W1 > 0:
        q1 = _plane_codes(row_ptrs, mask_n, WPR, P1_WORD0 + kb * (BLOCK_K * W1 // 32), P1_SHIFT, W1,
                          BLOCK_K, ALIGNED)
        q = q | (q1 << W0)
    if W2 > 0:
        q2 = _plane_codes(row_ptrs, mask_n, WPR, P2_WORD0 + kb * (BLOCK_K * W2 // 32), P2_SHIFT, W2,
                          BLOCK_K, ALIGNED)
        q = q | (q2 << (W0 + W1))
    return q


@triton.jit
def _per_weight(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BN, NG] per-group tile broadcast to [BN, BLOCK_K] (each group's value over its columns)."""
    NG: tl.constexpr = p.shape[1]
    return tl.reshape(tl.broadcast_to(p[:, :, None], [BLOCK_N, NG, BLOCK_K // NG]), [BLOCK_N, BLOCK_K])


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer arithmetic.

    Only for the interpreter's bf16 emulation: Triton's interpreter (3.6-3.9) truncates fp32 -> bf16 casts.
    """
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dot_acc(x, w, acc, EMULATE_BF16_DOT: tl.constexpr):
    """acc + x @ w^T for x [BM, BK] in the activation dtype and w [BN, BK] fp32 (rounded to x's dtype)."""
    if EMULATE_BF16_DOT:
        # Triton's interpreter (3.6-3.9) runs tl.dot on bf16's uint16 storage (garbage). bf16 x bf16 products
        # are exact in fp32, so an fp32 dot of bf16-rounded values is the same computation.
        return tl.dot(x.to(tl.float32), tl.trans(_round_to_bf16(w)), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")


@triton.jit
def _load_table(codebook_ptr, offs_n, mask_n, stride_codebook_n, stride_codebook_entry, BITS: tl.constexpr,
                SHARED_TABLE: tl.constexpr, LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The table as the lookup needs it, loaded once per program (before the K loop), fp32.

    "gather": the [BN, 2^bits] tile; "select": the same tile for <= 4 entries (columns are picked out
    below); "load": nothing (a [BN, 1] placeholder, the values are loaded per weight).
    """
    if LOOKUP == "load":
        tbl = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    else:
        T: tl.constexpr = 1 << BITS
        offs_t = tl.arange(0, T)
        if SHARED_TABLE:
            t = tl.load(codebook_ptr + offs_t * stride_codebook_entry).to(tl.float32)  # [T], one table for all rows
            tbl = tl.broadcast_to(t[None, :], [BLOCK_N, T])
        else:
            tbl = tl.load(codebook_ptr + offs_n[:, None] * stride_codebook_n + offs_t[None, :] * stride_codebook_entry,
                          mask=mask_n[:, None], other=0.0).to(tl.float32)  # [BN, T]
    return tbl


@triton.jit
def _table_entry(tbl, c: tl.constexpr, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Column c of the [BN, T] table tile as [BN, 1], for the select lookup (once per program, not
    per weight); a zero placeholder for the other lookups and for entries beyond the table."""
    col = tl.zeros([tbl.shape[0], 1], dtype=tl.float32)
    if LOOKUP == "select":
        if c < (1 << BITS):
            col = tl.sum(tl.where((tl.arange(0, 1 << BITS) == c)[None, :], tbl, 0.0), axis=1)[:, None]
    return col


@triton.jit
def _lookup(q, tbl, t0, t1, t2, t3, codebook_ptr, offs_n, stride_codebook_n, stride_codebook_entry, mask_n,
            BITS: tl.constexpr, SHARED_TABLE: tl.constexpr, LOOKUP: tl.constexpr):
    """fp32 table values [BN, BK] of the codes q [BN, BK] (uint32, each < 2^bits)."""
    if LOOKUP == "select":
        v = tl.where((q & 1) != 0, t1, t0)
        if BITS == 2:
            v = tl.where((q & 2) != 0, tl.where((q & 1) != 0, t3, t2), v)
    elif LOOKUP == "gather":
        v = tl.gather(tbl, q.to(tl.int32), axis=1)
    else:
        idx = q.to(tl.int32) * stride_codebook_entry
        if SHARED_TABLE:
            v = tl.load(codebook_ptr + idx)
        else:
            v = tl.load(codebook_ptr + offs_n[:, None] * stride_codebook_n + idx, mask=mask_n[:, None], other=0.0)
        v = v.to(tl.float32)
    return v


@triton.jit
def _group_scales(scales_ptr, offs_n, mask_n, kb, K, stride_scales_n, stride_scales_g,
                  GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 scales [BN, NG] of the NG groups K block kb touches (NG = 1 per-channel or groups >= BLOCK_K)."""
    if GROUP_SIZE == -1:
        offs_g = tl.zeros([1], dtype=tl.int32)
    elif GROUP_SIZE >= BLOCK_K:
        offs_g = tl.zeros([1], dtype=tl.int32) + (kb * BLOCK_K) // GROUP_SIZE
    else:
        offs_g = kb * (BLOCK_K // GROUP_SIZE) + tl.arange(0, BLOCK_K // GROUP_SIZE)
    mask = mask_n[:, None] & (offs_g * GROUP_SIZE < K)[None, :]
    s = tl.load(scales_ptr + offs_n[:, None] * stride_scales_n + offs_g[None, :] * stride_scales_g,
                mask=mask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _dequant_tile(v, scales_ptr, offs_n, offs_k, mask_n, K, kb, stride_scales_n, stride_scales_g,
                  GROUP_SIZE: tl.constexpr, HAS_SCALES: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """fp32 weights [BN, BK] = T[q] * s (the documented formula, one rounding); exactly 0 outside (N, K)."""
    if HAS_SCALES:
        s = _group_scales(scales_ptr, offs_n, mask_n, kb, K, stride_scales_n, stride_scales_g, GROUP_SIZE, BLOCK_K)
        v = v * _per_weight(s, BLOCK_N, BLOCK_K)
    # Outside (N, K) the tile must be exactly 0 even if a table entry or scale is inf/NaN.
    return tl.where(mask_n[:, None] & (offs_k < K)[None, :], v, 0.0)


@triton.jit
def codebook_gemv_kernel(
    # pointers (out is written when SPLIT_K == 1, the fp32 workspace ws accumulated otherwise)
    x_ptr, packed_ptr, codebook_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr,
    # sizes: WPR = words per packed row; plane 1 / 2 start at bit 32 * P*_WORD0 + P*_SHIFT of a row
    M, N, K, WPR, P1_WORD0, P1_SHIFT, P2_WORD0, P2_SHIFT,
    # strides: x (M, K); packed (N, words); codebook (N or 1, 2^bits); scales (N, groups); out and ws (M, N)
    stride_xm, stride_xk, stride_packed_n, stride_codebook_n, stride_codebook_entry, stride_scales_n, stride_scales_g,
    stride_om, stride_ws_m,
    # meta-parameters: BITS = W0 + W1 + W2 (plane widths), ALIGNED = every plane starts on a word
    BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, ALIGNED: tl.constexpr,
    GROUP_SIZE: tl.constexpr, HAS_SCALES: tl.constexpr, SHARED_TABLE: tl.constexpr, LOOKUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr = False,  # interpreter only, see _dot_acc
):
    """Decode path: out[m, n] = sum_k x[m, k] * T[q[n, k]] * s[n, k // G] (+ bias), K split over SPLIT_K."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)  # > 0 only for fp32 activations with M > 16 (see codebook_matmul)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    tbl = _load_table(codebook_ptr, offs_n, mask_n, stride_codebook_n, stride_codebook_entry, BITS, SHARED_TABLE,
                      LOOKUP, BLOCK_N)
    t0 = _table_entry(tbl, 0, BITS, LOOKUP)
    t1 = _table_entry(tbl, 1, BITS, LOOKUP)
    t2 = _table_entry(tbl, 2, BITS, LOOKUP)
    t3 = _table_entry(tbl, 3, BITS, LOOKUP)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    for kb in range(pid_k, num_kb, SPLIT_K):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        q = _codes_tile(packed_ptr, offs_n, mask_n, stride_packed_n, WPR, kb, P1_WORD0, P1_SHIFT, P2_WORD0,
                        P2_SHIFT, W0, W1, W2, BLOCK_K, ALIGNED)  # [BN, BK] uint32
        v = _lookup(q, tbl, t0, t1, t2, t3, codebook_ptr, offs_n, stride_codebook_n, stride_codebook_entry, mask_n,
                    BITS, SHARED_TABLE, LOOKUP)  # [BN, BK] fp32 table values
        if BLOCK_M == 1:
            # M == 1: a register reduction, the group scale applied once per group (not per weight).
            x = tl.load(x_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            if HAS_SCALES and GROUP_SIZE != -1:
                s = _group_scales(scales_ptr, offs_n, mask_n, kb, K, stride_scales_n, stride_scales_g,
                                  GROUP_SIZE, BLOCK_K)  # [BN, NG]
                NG: tl.constexpr = s.shape[1]
                part = tl.sum(tl.reshape(v * x[None, :], [BLOCK_N, NG, BLOCK_K // NG]), axis=2)  # [BN, NG]
                acc += tl.sum(part * s, axis=1)
            else:
                acc += tl.sum(v * x[None, :], axis=1)  # per-channel scale applied after the loop
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            w = _dequant_tile(v, scales_ptr, offs_n, offs_k, mask_n, K, kb, stride_scales_n, stride_scales_g,
                              GROUP_SIZE, HAS_SCALES, BLOCK_N, BLOCK_K)  # [BN, BK]
            acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)
    if BLOCK_M == 1 and HAS_SCALES and GROUP_SIZE == -1:
        s = _group_scales(scales_ptr, offs_n, mask_n, 0, K, stride_scales_n, stride_scales_g,
                          GROUP_SIZE, BLOCK_K)  # [BN, 1]
        acc = acc * tl.reshape(s, [BLOCK_N])
    if HAS_BIAS:
        first_split = tl.full([BLOCK_N], pid_k, tl.int32) == 0  # only split 0 adds the bias
        b = tl.load(bias_ptr + offs_n, mask=mask_n & first_split, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc += b
        else:
            acc += b[None, :]
    if SPLIT_K == 1:
        # Stored directly in the activation dtype: no workspace, no second launch.
        if EMULATE_BF16_DOT:
            acc = _round_to_bf16(acc)  # the interpreter's own fp32 -> bf16 store would truncate
        if BLOCK_M == 1:
            tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_n[None, :])
    else:
        if BLOCK_M == 1:
            tl.atomic_add(ws_ptr + offs_n, acc, mask=mask_n)
        else:
            tl.atomic_add(ws_ptr + offs_m[:, None] * stride_ws_m + offs_n[None, :], acc,
                          mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def codebook_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, codebook_ptr, scales_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET is only an autotune key: next power of two of M); planes as in the decode kernel
    M, N, K, M_BUCKET, WPR, P1_WORD0, P1_SHIFT, P2_WORD0, P2_SHIFT,
    # strides: x (M, K); packed (N, words); codebook (N or 1, 2^bits); scales (N, groups); out (M, N)
    stride_xm, stride_xk, stride_packed_n, stride_codebook_n, stride_codebook_entry, stride_scales_n, stride_scales_g,
    stride_om, stride_on,
    # meta-parameters
    BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, ALIGNED: tl.constexpr,
    GROUP_SIZE: tl.constexpr, HAS_SCALES: tl.constexpr, SHARED_TABLE: tl.constexpr, LOOKUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr = False,  # interpreter only, see _dot_acc
):
    """Prefill path: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) with tensor-core tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tbl = _load_table(codebook_ptr, offs_n, mask_n, stride_codebook_n, stride_codebook_entry, BITS, SHARED_TABLE,
                      LOOKUP, BLOCK_N)
    t0 = _table_entry(tbl, 0, BITS, LOOKUP)
    t1 = _table_entry(tbl, 1, BITS, LOOKUP)
    t2 = _table_entry(tbl, 2, BITS, LOOKUP)
    t3 = _table_entry(tbl, 3, BITS, LOOKUP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # [BM, BK]
        q = _codes_tile(packed_ptr, offs_n, mask_n, stride_packed_n, WPR, kb, P1_WORD0, P1_SHIFT, P2_WORD0,
                        P2_SHIFT, W0, W1, W2, BLOCK_K, ALIGNED)  # [BN, BK] uint32
        v = _lookup(q, tbl, t0, t1, t2, t3, codebook_ptr, offs_n, stride_codebook_n, stride_codebook_entry, mask_n,
                    BITS, SHARED_TABLE, LOOKUP)
        w = _dequant_tile(v, scales_ptr, offs_n, offs_k, mask_n, K, kb, stride_scales_n, stride_scales_g,
                          GROUP_SIZE, HAS_SCALES, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16_DOT:
        acc = _round_to_bf16(acc)  # the interpreter's own fp32 -> bf16 store would truncate
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_GEMV_KEY = ["BLOCK_M", "N", "K", "BITS", "GROUP_SIZE", "HAS_SCALES", "SHARED_TABLE"]
_gemv_direct = triton.autotune(
    configs=gemv_configs(), key=_GEMV_KEY, prune_configs_by={"early_config_prune": _prune_gemv},
)(codebook_gemv_kernel)
_gemv_split = triton.autotune(
    configs=gemv_configs(split=True), key=_GEMV_KEY, prune_configs_by={"early_config_prune": _prune_gemv},
    reset_to_zero=["ws_ptr"],  # benchmarking re-runs the atomics into the same workspace
)(codebook_gemv_kernel)

_matmul_autotuned = triton.autotune(
    configs=matmul_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_SCALES", "SHARED_TABLE"],
    prune_configs_by={"early_config_prune": _prune_matmul},
)(codebook_matmul_kernel)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
# True when the kernels above were defined under TRITON_INTERPRET=1 (Triton reads it when each
# ``@triton.jit`` runs, so setting it after this module is imported changes nothing).
_INTERPRETED = not isinstance(codebook_gemv_kernel, triton.runtime.JITFunction)
# What a CPU caller can use instead (named in _check_launchable's error).
_CPU_ALTERNATIVES = ("CodebookLinear (triton_kernels.nn), "
                     "or codebook_matmul_reference (pure torch)")


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


def _num_words(K: int, bits: int) -> int:
    return (K * bits + 31) // 32


def _num_groups(K: int, group_size: int) -> int:
    return 1 if group_size == -1 else (K + group_size - 1) // group_size


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def check_group_size(group_size) -> None:
    ok = isinstance(group_size, int) and not isinstance(group_size, bool) and (
        group_size == -1 or (group_size >= 1 and group_size & (group_size - 1) == 0))
    if not ok:
        raise ValueError(f"group_size must be -1 (one group per row) or a power of two such as 16, 32, "
                         f"64, 128, 256; got {group_size!r}")


def check_weight(packed, codebook, scales, bits, group_size, K):
    """Validates the codebook-quantized weight; returns N."""
    check_bits(bits)
    check_group_size(group_size)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be an int32 torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must have dtype torch.int32 (from pack()), got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D (N, ceil(K*bits/32)), got shape {tuple(packed.shape)}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    N, W = packed.shape
    if W != _num_words(K, bits):
        raise ValueError(f"packed has {W} words per row, but K={K} at bits={bits} needs "
                         f"ceil(K*bits/32) = {_num_words(K, bits)}")
    T = 2 ** bits
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a float torch.Tensor of shape ({N}, {T}) or (1, {T}), "
                        f"got {type(codebook).__name__}")
    if codebook.dtype not in SUPPORTED_PARAM_DTYPES:
        raise TypeError(f"codebook must be float16, bfloat16 or float32, got {codebook.dtype}")
    if codebook.dim() != 2 or codebook.shape[1] != T or codebook.shape[0] not in (1, N):
        raise ValueError(f"codebook has shape {tuple(codebook.shape)}, but bits={bits} over N={N} rows needs "
                         f"({N}, {T}) (one table per row) or (1, {T}) (one shared table)")
    if codebook.device != packed.device:
        raise ValueError(f"codebook is on {codebook.device} but packed is on {packed.device}")
    if scales is not None:
        G = _num_groups(K, group_size)
        if not isinstance(scales, torch.Tensor):
            raise TypeError(f"scales must be None or a torch.Tensor of shape ({N}, {G}), got "
                            f"{type(scales).__name__}")
        if scales.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
        if tuple(scales.shape) != (N, G):
            raise ValueError(f"scales has shape {tuple(scales.shape)}, but K={K} with group_size={group_size} "
                             f"over N={N} rows needs ({N}, {G})")
        if scales.device != packed.device:
            raise ValueError(f"scales is on {scales.device} but packed is on {packed.device}")
    return N


def _check_call(x, packed, codebook, scales, bits, group_size, bias, out):
    """Validates a matmul call; returns (K, N)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 (activations), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    if isinstance(packed, torch.Tensor) and packed.dim() == 2 and packed.dtype == torch.int32:
        check_bits(bits)
        if packed.shape[1] != _num_words(K, bits):
            raise ValueError(f"K mismatch: x has K={K} (x.shape[-1]), which at bits={bits} needs "
                             f"{_num_words(K, bits)} packed words per row, but packed has {packed.shape[1]}")
    N = check_weight(packed, codebook, scales, bits, group_size, K)
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but packed is on {packed.device}; move them to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point torch.Tensor of shape ({N},) or None")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if out is not None:
        want = (*x.shape[:-1], N)
        if not isinstance(out, torch.Tensor) or out.dtype != x.dtype or tuple(out.shape) != want:
            raise ValueError(f"out must be a tensor of shape {want} and dtype {x.dtype}")
        if not out.is_contiguous() or out.device != x.device:
            raise ValueError(f"out must be contiguous and on {x.device}")
    return K, N


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: small, so that the tests' N take both decode variants
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def plane_args(K: int, bits: int) -> dict:
    """The kernels' plane arguments for a (K, bits) weight: widths, where planes 1 and 2 start, alignment."""
    widths = planes(bits) + (0,) * (3 - len(planes(bits)))
    start1, start2 = K * widths[0], K * (widths[0] + widths[1])
    return dict(WPR=_num_words(K, bits), P1_WORD0=start1 // 32, P1_SHIFT=start1 % 32,
                P2_WORD0=start2 // 32, P2_SHIFT=start2 % 32,
                W0=widths[0], W1=widths[1], W2=widths[2], ALIGNED=start1 % 32 == 0 and start2 % 32 == 0)


def codebook_matmul(x, packed, codebook, scales=None, *, bits, group_size=-1, bias=None, out=None, lookup=None):
    """``x @ dequantize_codebook(packed, codebook, scales)^T (+ bias)`` in x's dtype, accumulated in fp32.

    x: (..., K) fp16/bf16/fp32; K is x.shape[-1]. M = prod(x.shape[:-1]) <= 16 takes the decode
    kernel, larger M the tiled tensor-core kernel (fp32 x: the decode kernel at every M).
    ``out``: optional preallocated contiguous (..., N) tensor of x's dtype. ``lookup``: force a
    lookup strategy ("gather" or "load" at any bits, "select" at bits <= 2) instead of
    ``lookup_mode(bits)``, for benchmarks that compare them; the result is the same.
    """
    K, N = _check_call(x, packed, codebook, scales, bits, group_size, bias, out)
    if lookup is not None and (lookup not in ("select", "gather", "load") or (lookup == "select" and bits > 2)):
        raise ValueError(f"lookup must be None, 'gather', 'load' or (bits <= 2) 'select'; got {lookup!r} at "
                         f"bits={bits}")
    _check_launchable(x, "codebook_matmul")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # a view for sliced/offset x whenever reshape can view it
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*lead, N), device=x.device, dtype=x.dtype)
    out2 = out.view(M, N)
    if M == 0:
        return out
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    plane_meta = plane_args(K, bits)  # the plane sizes (runtime ints) come out, the constexprs stay
    plane_sizes = [plane_meta.pop(k) for k in ("WPR", "P1_WORD0", "P1_SHIFT", "P2_WORD0", "P2_SHIFT")]
    shared = codebook.shape[0] == 1
    scales_arg = scales if scales is not None else codebook  # unused when not HAS_SCALES
    bias_arg = bias if bias is not None else codebook  # unused when not HAS_BIAS
    param_strides = (0 if shared else codebook.stride(0), codebook.stride(1),  # one shared table: stride 0
                     *((scales.stride(0), scales.stride(1)) if scales is not None else (0, 0)))
    amd = x.is_cuda and torch.version.hip is not None
    common = dict(BITS=bits, GROUP_SIZE=group_size, HAS_SCALES=scales is not None, SHARED_TABLE=shared,
                  LOOKUP=lookup or lookup_mode(bits, amd), HAS_BIAS=bias is not None,
                  EMULATE_BF16_DOT=_interpreting() and x.dtype == torch.bfloat16, **plane_meta)
    if M <= GEMV_MAX_M or x.dtype == torch.float32:
        # fp32 activations take the decode kernel at every M, 16 rows per program along grid axis 2
        # (as dequant_matmul: no ieee fp32 tl.dot tile big enough for prefill compiles without spills).
        block_m = 1 if M == 1 else 16
        # Split K only where the rows alone give too few programs to keep every SM streaming.
        split = triton.cdiv(N, 64) * triton.cdiv(M, block_m) < 2 * _num_sms(x.device)
        ws = torch.zeros((M, N), device=x.device, dtype=torch.float32) if split else out2
        kernel = _gemv_split if split else _gemv_direct
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"], triton.cdiv(M, block_m))  # noqa: E731
        kernel[grid](
            x2, packed, codebook, scales_arg, bias_arg, out2, ws,
            M, N, K, *plane_sizes,
            x2.stride(0), x2.stride(1), packed.stride(0), *param_strides, out2.stride(0), ws.stride(0),
            BLOCK_M=block_m, **common)
        if split:
            out2.copy_(ws)  # the cast to the activation dtype, after all K splits have landed
    else:
        m_bucket = min(triton.next_power_of_2(M), 4096)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _matmul_autotuned[grid](
            x2, packed, codebook, scales_arg, bias_arg, out2,
            M, N, K, m_bucket, *plane_sizes,
            x2.stride(0), x2.stride(1), packed.stride(0), *param_strides, out2.stride(0), out2.stride(1),
            **common)
    return out


# ----------------------------------------------------------------------------------------------
# Pure-torch references
# ----------------------------------------------------------------------------------------------
def dequantize_codebook(packed, codebook, scales=None, *, bits, group_size=-1, K):
    """fp32 (N, K) weights ``codebook[r, q] * s`` (module docstring; the kernels match it bit for bit)."""
    N = check_weight(packed, codebook, scales, bits, group_size, K)
    q = unpack(packed, bits, K).long()
    table = codebook.float().expand(N, 2 ** bits)
    w = torch.gather(table, 1, q)
    if scales is not None:
        gs = K if group_size == -1 else group_size
        w = w * scales.float().repeat_interleave(gs, dim=1)[:, :K]
    return w.contiguous()


def codebook_matmul_reference(x, packed, codebook, scales=None, *, bits, group_size=-1, bias=None, out=None):
    """Same contract as ``codebook_matmul``; the product and bias in float64, rounded once to x's dtype."""
    K, N = _check_call(x, packed, codebook, scales, bits, group_size, bias, out)
    w = dequantize_codebook(packed, codebook, scales, bits=bits, group_size=group_size, K=K)
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------------------------
# Packing helpers (copies of dequant_matmul's: the same layout, checked by the tests)
# ----------------------------------------------------------------------------------------------
def _stream_words(codes, width: int):
    """int64 (N, K) codes of a power-of-two ``width`` -> int64 (N, ceil(K*width/32)) LSB-first words."""
    N, K = codes.shape
    per = 32 // width
    W = (K * width + 31) // 32
    c = torch.zeros((N, W * per), dtype=torch.int64, device=codes.device)
    c[:, :K] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * width
    return (c.view(N, W, per) << shifts).sum(dim=2)  # disjoint bit fields: sum == OR


def pack(q, bits):
    """Codes (N, K) in [0, 2^bits) -> int32 (N, ceil(K*bits/32)) bit planes (see the module docstring)."""
    check_bits(bits)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be an integer torch.Tensor of shape (N, K), got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must have an integer dtype (codes), got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D (N, K), got shape {tuple(q.shape)}")
    N, K = q.shape
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"q has codes in [{int(q.min())}, {int(q.max())}], outside [0, {2 ** bits - 1}] "
                         f"for bits={bits}")
    # One bit stream per row: plane 0's K codes, then plane 1's, ... Each plane is packed into whole
    # words (codes never straddle inside it) and shifted to its start bit K * (lower widths).
    total = _num_words(K, bits)
    words = torch.zeros((N, total + 1), dtype=torch.int64, device=q.device)
    lo = 0
    for width in planes(bits):
        pw = _stream_words((q >> lo) & ((1 << width) - 1), width)
        start = K * lo
        w0, sh = divmod(start, 32)
        n = pw.shape[1]
        words[:, w0:w0 + n] |= (pw << sh) & 0xFFFFFFFF
        if sh:
            words[:, w0 + 1:w0 + 1 + n] |= pw >> (32 - sh)
        lo += width
    words = words[:, :total]
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement into int32
    return words.to(torch.int32).contiguous()


def unpack(packed, bits, K):
    """Inverse of ``pack``: int32 (N, ceil(K*bits/32)) -> uint8 codes (N, K)."""
    check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise TypeError("packed must be an int32 torch.Tensor (from pack())")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D, got shape {tuple(packed.shape)}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be a non-negative int, got {K!r}")
    if packed.shape[1] != _num_words(K, bits):
        raise ValueError(f"packed has {packed.shape[1]} words per row, but K={K} at bits={bits} needs "
                         f"{_num_words(K, bits)}")
    N = packed.shape[0]
    words = torch.zeros((N, packed.shape[1] + 1), dtype=torch.int64, device=packed.device)
    words[:, :-1] = packed.to(torch.int64) & 0xFFFFFFFF
    q = torch.zeros((N, K), dtype=torch.int64, device=packed.device)
    lo = 0
    for width in planes(bits):
        # The plane is whole words starting at stream bit K * lo (see pack): realign them with two
        # shifted slices, then split each word into its 32 / width fields (no gather per code).
        per = 32 // width
        n = (K * width + 31) // 32
        w0, sh = divmod(K * lo, 32)
        pw = ((words[:, w0:w0 + n] >> sh) | (words[:, w0 + 1:w0 + 1 + n] << (32 - sh))) & 0xFFFFFFFF
        shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * width
        fields = (pw.unsqueeze(-1) >> shifts) & ((1 << width) - 1)  # (N, n, per)
        q |= fields.reshape(N, n * per)[:, :K] << lo
        lo += width
    return q.to(torch.uint8).contiguous()
