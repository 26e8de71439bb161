"""Weight-only quantized linear: ``y = x @ dequant(W)^T (+ bias)`` with 1-8-bit packed weights.

Math: ``W`` (N, K) is stored as codes ``q`` in [0, 2^bits) with a scale ``s`` and, asymmetric, a zero
point ``z`` per group of ``group_size`` consecutive weights of a row (-1: one group per row). In fp32,
exactly as ``dequantize`` computes it and bit for bit as both kernels do (two roundings, no FMA)::

    asymmetric:  w = (q.float() - z.float()) * s.float()      # z may be any float (GGUF Q4_1)
    symmetric:   w = (q.float() - 2**(bits-1)) * s.float()    # zeros ignored (may be None)

Shapes and dtypes:
- ``x`` (..., K) fp16 / bf16 / fp32 -> (..., N) in x's dtype, fp32 accumulation; fp32 x uses ieee dots.
- ``packed`` int32 (N, ceil(K * bits / 32)) from ``pack``; ``scales`` / ``zeros`` (N, ceil(K / group_size))
  fp16 / bf16 / fp32; ``bias`` (N,), added in fp32. ``group_size`` -1 or a power of two (K need not be a multiple).
- Layout of ``packed`` (QuantLinear and ``from_gguf`` build on it): each row is one LSB-first bit stream;
  a code is split into power-of-two bit planes, low bits first (``planes``: 3 = 2+1, 5 = 4+1, 6 = 4+2,
  7 = 4+2+1), stored plane after plane, so a weight costs exactly ``bits`` bits. At 1/2/4/8 bits this is
  the usual layout (4 bits: code k at bit 4*(k % 8) of word k // 8). Worked example: docs/kernels.md.

Kernels: ``dequant_gemv_kernel`` (M <= 16, and fp32 x at any M) unpacks whole packed words in registers
and splits K where the rows alone give too few programs; ``dequant_matmul_kernel`` (M > 16) is a tiled
``tl.dot`` kernel; autotuned, or ``config=`` (``launch_plan``, ``chosen_config``). Limits: K is taken from x,
checked against the word and group counts only. ``TRITON_INTERPRET=1``: one small config, bf16 dots in fp32.

Public API: ``pack``, ``unpack``, ``planes``, ``dequantize``, ``dequant_matmul``, ``dequant_matmul_reference``,
``quantize_rtn``, ``from_gguf``, ``launch_plan``, ``chosen_config``. Imports only torch and triton.
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


def gemv_configs(interpret: bool | None = None, split: bool = False) -> list:
    """Autotune configs of the decode kernel (``split``: the split-K variant); one under the interpreter.

    Every config loads whole packed words: a row's BLOCK_K * width / 32 words of each plane are
    contiguous, and BLOCK_N * BLOCK_K / 32 >= 2 x threads gives every thread at least two consecutive
    words of even a 1-bit plane, so the loads are 64- or 128-bit vectors (``weight_load_bits`` of the
    ``dequant_gemv`` rows in results/compile_check.csv).
    """
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2 if split else 1},
                              num_warps=4, num_stages=1)]
    out = []
    for bn, bk, warps in [(16, 512, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8)]:
        for sk in ((4,) if split else (1,)):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps,
                                     num_stages=2))
    return out


def matmul_configs(interpret: bool | None = None) -> list:
    """Autotune configs of the prefill (tiled tl.dot) kernel; one small config under the interpreter."""
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    out = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


def fp32_configs(split: bool = False) -> list:
    """The decode configs for fp32 activations with BLOCK_M=16 (the pruner swaps them in): an ieee fp32
    tl.dot has no tensor-core path and is register-hungry, so the tile is the largest that neither spills
    nor uses local memory (docs/kernels.md, "Tile choices"). A correctness path, not a speed one: such
    small tiles load packed words 32 bits at a time."""
    return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4 if split else 1}, num_warps=8,
                          num_stages=2)]


def multirow_configs(split: bool = False) -> list:
    """The decode configs for 2 <= M <= 16 with fp16/bf16 activations (the pruner swaps them in): a
    16-row tl.dot tile holds the unpacked codes, the dequantized tile and the dot operands at once; this
    is the one tile that is spill-free with >= 64-bit weight loads on every target and variant checked
    (the ``dequant_gemv`` ``BLOCK_M=16`` rows of results/compile_check.csv; the tiles that were not:
    docs/kernels.md, "Tile choices")."""
    return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4 if split else 1}, num_warps=8,
                          num_stages=4)]


def _prune_gemv(configs, named_args, **kwargs):
    """Drop K blocks wider than the row (beyond 32) and K splits with nothing to do; keep at least one."""
    args = {**named_args, **kwargs}
    K = args["K"]
    if args["BLOCK_M"] > 1 and not _interpreting():
        if args["x_ptr"].dtype == torch.float32:
            configs = fp32_configs(split=configs[0].kwargs["SPLIT_K"] > 1)
        else:
            configs = multirow_configs(split=configs[0].kwargs["SPLIT_K"] > 1)
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))
            and c.kwargs["SPLIT_K"] <= triton.cdiv(K, c.kwargs["BLOCK_K"])]
    return kept or configs[-1:]


def _prune_matmul(configs, named_args, **kwargs):
    """Drop tiles taller than the M bucket (pure padding) or wider than N / K; keep at least one."""
    args = {**named_args, **kwargs}
    m_bucket, N, K = args["M_BUCKET"], args["N"], args["K"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(32, m_bucket)
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
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
def _group_params(scales_ptr, zeros_ptr, stride_scales_n, stride_scales_g, stride_zeros_n, stride_zeros_g,
                  offs_n, mask_n, kb, K,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 scales and zero points [BN, NG] of the NG groups that K block kb touches (NG = 1 for
    per-channel or groups >= BLOCK_K); the zero is 2^(bits-1) when symmetric."""
    if GROUP_SIZE == -1:
        offs_g = tl.zeros([1], dtype=tl.int32)
    elif GROUP_SIZE >= BLOCK_K:
        offs_g = tl.zeros([1], dtype=tl.int32) + (kb * BLOCK_K) // GROUP_SIZE
    else:
        offs_g = kb * (BLOCK_K // GROUP_SIZE) + tl.arange(0, BLOCK_K // GROUP_SIZE)
    mask = mask_n[:, None] & (offs_g * GROUP_SIZE < K)[None, :]
    s = tl.load(scales_ptr + offs_n[:, None] * stride_scales_n + offs_g[None, :] * stride_scales_g,
                mask=mask, other=0.0)
    s = s.to(tl.float32)
    if SYMMETRIC:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
    else:
        z = tl.load(zeros_ptr + offs_n[:, None] * stride_zeros_n + offs_g[None, :] * stride_zeros_g,
                    mask=mask, other=0.0)
        z = z.to(tl.float32)
    return s, z


@triton.jit
def _per_weight(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BN, NG] per-group tile broadcast to [BN, BLOCK_K] (each group's value over its columns)."""
    NG: tl.constexpr = p.shape[1]
    return tl.reshape(tl.broadcast_to(p[:, :, None], [BLOCK_N, NG, BLOCK_K // NG]), [BLOCK_N, BLOCK_K])


@triton.jit
def _dequant_elementwise(q, s, z, offs_k, mask_n, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights [BN, BK] = (q - z) * s, the documented formula (two roundings, no FMA), from the
    tile's per-group scales and zeros s, z [BN, NG] (``_group_params``), broadcast over each group."""
    w = (q.to(tl.float32) - _per_weight(z, BLOCK_N, BLOCK_K)) * _per_weight(s, BLOCK_N, BLOCK_K)
    # Outside (N, K) the tile must be exactly 0 even if a scale is inf/NaN (0 * inf = NaN).
    return tl.where(mask_n[:, None] & (offs_k < K)[None, :], w, 0.0)


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
def _k_block(
    acc, accq, xsum,  # running sums: the result; per-channel only: sum_k x q and sum_k x
    x, q, s, z,  # this K block: activations [BK] or [BM, BK], codes [BN, BK], group scales / zeros [BN, NG]
    offs_k, mask_n, K,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr,
):
    """One K block of the decode kernel: sum_k x[m, k] * (q[n, k] - z) * s.

    M == 1, factored per group: the codes are multiplied as they are (small exact integers) and each
    group's zero and scale applied once: s * (sum_k x q - z * sum_k x). Per-channel (s, z unused here)
    the sums accq, xsum are carried to the end. M > 1: one tl.dot per tile on the codes where the tile
    lies inside one group (the same factoring), else on the dequantized tile.
    """
    if GROUP_SIZE == -1:
        if BLOCK_M == 1:
            accq += tl.sum(q.to(tl.float32) * x[None, :], axis=1)  # [BN]
            xsum += tl.sum(x, axis=0)
        else:
            accq = _dot_acc(x, q.to(tl.float32), accq, EMULATE_BF16_DOT)  # [BM, BN]
            xsum += tl.sum(x.to(tl.float32), axis=1)[:, None]  # [BM, 1]
    elif BLOCK_M == 1:
        NG: tl.constexpr = s.shape[1]
        part = tl.sum(tl.reshape(q.to(tl.float32) * x[None, :], [BLOCK_N, NG, BLOCK_K // NG]), axis=2)
        xs = tl.sum(tl.reshape(x, [NG, BLOCK_K // NG]), axis=1)  # [NG]
        acc += tl.sum((part - z * xs[None, :]) * s, axis=1)
    elif GROUP_SIZE >= BLOCK_K:  # s, z: [BN, 1]
        part = _dot_acc(x, q.to(tl.float32), tl.zeros(acc.shape, tl.float32), EMULATE_BF16_DOT)  # [BM, BN]
        xs = tl.sum(x.to(tl.float32), axis=1)[:, None]  # [BM, 1]
        acc += (part - xs * tl.reshape(z, [1, BLOCK_N])) * tl.reshape(s, [1, BLOCK_N])
    else:
        w = _dequant_elementwise(q, s, z, offs_k, mask_n, K, BLOCK_N, BLOCK_K)
        acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)
    return acc, accq, xsum


@triton.jit
def dequant_gemv_kernel(
    # pointers (out is written when SPLIT_K == 1, the fp32 workspace ws accumulated otherwise)
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr,
    # sizes: WPR = words per packed row; plane 1 / 2 start at bit 32 * P*_WORD0 + P*_SHIFT of a row
    M, N, K, WPR, P1_WORD0, P1_SHIFT, P2_WORD0, P2_SHIFT,
    # strides: x (M, K); packed (N, words); scales, zeros (N, groups); out and ws (M, N)
    stride_xm, stride_xk, stride_packed_n, stride_scales_n, stride_scales_g, stride_zeros_n, stride_zeros_g,
    stride_om, stride_ws_m,
    # meta-parameters: BITS = W0 + W1 + W2 (plane widths), ALIGNED = every plane starts on a word
    BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, ALIGNED: tl.constexpr,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr = False,  # interpreter only, see _dot_acc
):
    """Decode path: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias), K split over SPLIT_K programs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)  # > 0 only for fp32 activations with M > 16 (see dequant_matmul)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([1], dtype=tl.float32).sum(axis=0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    accq = tl.zeros(acc.shape, dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    for kb in range(pid_k, num_kb, SPLIT_K):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        q = _codes_tile(packed_ptr, offs_n, mask_n, stride_packed_n, WPR, kb, P1_WORD0, P1_SHIFT, P2_WORD0,
                        P2_SHIFT, W0, W1, W2, BLOCK_K, ALIGNED)  # [BN, BK] uint32
        if BLOCK_M == 1:
            # M == 1: a register reduction; padding to a 16-row MMA would waste 15/16 of it.
            x = tl.load(x_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        if GROUP_SIZE == -1:
            s = 0.0  # per-channel: the row's scale and zero are applied once, after the loop
            z = 0.0
        else:
            s, z = _group_params(scales_ptr, zeros_ptr, stride_scales_n, stride_scales_g, stride_zeros_n,
                                 stride_zeros_g, offs_n, mask_n, kb, K, BITS, GROUP_SIZE, SYMMETRIC, BLOCK_K)
        acc, accq, xsum = _k_block(acc=acc, accq=accq, xsum=xsum, x=x, q=q, s=s, z=z,
                                   offs_k=offs_k, mask_n=mask_n, K=K,
                                   GROUP_SIZE=GROUP_SIZE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                   EMULATE_BF16_DOT=EMULATE_BF16_DOT)
    if GROUP_SIZE == -1:
        s, z = _group_params(scales_ptr, zeros_ptr, stride_scales_n, stride_scales_g, stride_zeros_n, stride_zeros_g,
                             offs_n, mask_n, 0, K, BITS, GROUP_SIZE, SYMMETRIC, BLOCK_K)  # [BN, 1]
        if BLOCK_M == 1:
            acc = (accq - tl.reshape(z, [BLOCK_N]) * xsum) * tl.reshape(s, [BLOCK_N])
        else:
            acc = (accq - xsum * tl.reshape(z, [1, BLOCK_N])) * tl.reshape(s, [1, BLOCK_N])
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
def dequant_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET is only an autotune key: next power of two of M); planes as in the decode kernel
    M, N, K, M_BUCKET, WPR, P1_WORD0, P1_SHIFT, P2_WORD0, P2_SHIFT,
    # strides: x (M, K); packed (N, words); scales, zeros (N, groups); out (M, N)
    stride_xm, stride_xk, stride_packed_n, stride_scales_n, stride_scales_g, stride_zeros_n, stride_zeros_g,
    stride_om, stride_on,
    # meta-parameters
    BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, ALIGNED: tl.constexpr,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # [BM, BK]
        q = _codes_tile(packed_ptr, offs_n, mask_n, stride_packed_n, WPR, kb, P1_WORD0, P1_SHIFT, P2_WORD0,
                        P2_SHIFT, W0, W1, W2, BLOCK_K, ALIGNED)  # [BN, BK] uint32
        # Dequantized once per tile and shared by BLOCK_M rows, so the per-weight formula costs little
        # here; the decode kernel's factored form would need a second [BM, BN] accumulator, which
        # spills at these tiles (docs/kernels.md, "Tile choices").
        s, z = _group_params(scales_ptr, zeros_ptr, stride_scales_n, stride_scales_g, stride_zeros_n, stride_zeros_g,
                             offs_n, mask_n, kb, K, BITS, GROUP_SIZE, SYMMETRIC, BLOCK_K)  # [BN, NG]
        w = _dequant_elementwise(q, s, z, offs_k, mask_n, K, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16_DOT:
        acc = _round_to_bf16(acc)  # the interpreter's own fp32 -> bf16 store would truncate
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_GEMV_KEY = ["BLOCK_M", "N", "K", "BITS", "GROUP_SIZE", "SYMMETRIC"]
_gemv_direct = triton.autotune(
    configs=gemv_configs(), key=_GEMV_KEY, prune_configs_by={"early_config_prune": _prune_gemv},
)(dequant_gemv_kernel)
_gemv_split = triton.autotune(
    configs=gemv_configs(split=True), key=_GEMV_KEY, prune_configs_by={"early_config_prune": _prune_gemv},
    reset_to_zero=["ws_ptr"],  # benchmarking re-runs the atomics into the same workspace
)(dequant_gemv_kernel)

_matmul_autotuned = triton.autotune(
    configs=matmul_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune_matmul},
)(dequant_matmul_kernel)
_AUTOTUNERS = {"gemv": _gemv_direct, "gemv_split": _gemv_split, "matmul": _matmul_autotuned}


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
# True when the kernels above were defined under TRITON_INTERPRET=1 (Triton reads it when each
# ``@triton.jit`` runs, so setting it after this module is imported changes nothing).
_INTERPRETED = not isinstance(dequant_gemv_kernel, triton.runtime.JITFunction)
# What a CPU caller can use instead (named in _check_launchable's error).
_CPU_ALTERNATIVES = ("QuantLinear (triton_kernels.nn; its CPU backends run torch's kernels), "
                     "or dequant_matmul_reference (pure torch)")


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


def _check_param(name: str, t, N: int, G: int, K: int, group_size: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({N}, {G}), got {type(t).__name__}")
    if t.dtype not in SUPPORTED_PARAM_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if tuple(t.shape) != (N, G):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, but K={K} with group_size={group_size} "
                         f"over N={N} rows needs ({N}, {G})")


def check_weight(packed, scales, zeros, bits, group_size, K, symmetric):
    """Validates the quantized weight; returns N."""
    check_bits(bits)
    check_group_size(group_size)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
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
    G = _num_groups(K, group_size)
    _check_param("scales", scales, N, G, K, group_size)
    if not symmetric:
        if zeros is None:
            raise ValueError("zeros is required when symmetric=False (pass symmetric=True for w = (q - 2^(bits-1)) * s)")
        _check_param("zeros", zeros, N, G, K, group_size)
        if zeros.device != packed.device:
            raise ValueError(f"zeros is on {zeros.device} but packed is on {packed.device}")
    if scales.device != packed.device:
        raise ValueError(f"scales is on {scales.device} but packed is on {packed.device}")
    return N


def _check_call(x, packed, scales, zeros, bits, group_size, symmetric, bias, out):
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
    N = check_weight(packed, scales, zeros, bits, group_size, K, symmetric)
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


# The kernel variants a call can take, each with its autotuner (keys of ``config`` per variant below).
VARIANTS = ("gemv", "gemv_split", "matmul")
CONFIG_KEYS = {"gemv": ("BLOCK_N", "BLOCK_K", "SPLIT_K"), "gemv_split": ("BLOCK_N", "BLOCK_K", "SPLIT_K"),
               "matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}


def launch_plan(M: int, N: int, dtype: torch.dtype, device: torch.device) -> tuple[str, int]:
    """``(variant, m_bucket)`` of a call with M rows: which kernel runs (one of ``VARIANTS``) and the
    rows its autotune key sees (the decode kernel's BLOCK_M, 1 or 16; the prefill kernel's M_BUCKET)."""
    if M <= GEMV_MAX_M or dtype == torch.float32:
        # fp32 activations take the decode kernel at every M, 16 rows per program along grid axis 2:
        # no ieee fp32 tl.dot tile big enough for the prefill kernel compiles without spills.
        block_m = 1 if M == 1 else 16
        # Split K only where the rows alone give too few programs to keep every SM streaming
        # (fewer than 2 x 64-row tiles per SM); otherwise store directly, without workspace or copy.
        split = triton.cdiv(N, 64) * triton.cdiv(M, block_m) < 2 * _num_sms(device)
        return ("gemv_split" if split else "gemv"), block_m
    return "matmul", min(triton.next_power_of_2(M), 4096)


def chosen_config(variant: str) -> dict | None:
    """The config ``variant``'s autotuner ran last in this process, as a plain dict (its meta-parameters,
    ``num_warps``, ``num_stages``): what ``dequant_matmul(..., config=)`` takes. ``None`` before any
    autotuned launch of that variant (a call given ``config=`` does not autotune)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    best = getattr(_AUTOTUNERS[variant], "best_config", None)
    if best is None:
        return None
    return {**{k: int(best.kwargs[k]) for k in CONFIG_KEYS[variant]},
            "num_warps": int(best.num_warps), "num_stages": int(best.num_stages)}


def check_config(config, variant: str) -> dict:
    """Validate ``config`` for ``variant`` (see ``dequant_matmul``); returns the launch keyword arguments."""
    keys = (*CONFIG_KEYS[variant], "num_warps", "num_stages")
    if not isinstance(config, dict) or set(config) != set(keys):
        raise ValueError(f"config must be a dict with exactly the keys {', '.join(keys)} for the {variant} kernel "
                         f"(this call's M, N and dtype take it), got "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}")
    for k in keys:
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config[{k!r}] must be a positive int, got {v!r}")
        if k.startswith("BLOCK_") and v & (v - 1):
            raise ValueError(f"config[{k!r}] must be a power of two, got {v}")
    if variant == "gemv" and config["SPLIT_K"] != 1:
        raise ValueError(f"config['SPLIT_K'] must be 1 for the gemv kernel (it stores directly; this call's rows "
                         f"fill the GPU), got {config['SPLIT_K']}")
    return dict(config)


def dequant_matmul(x, packed, scales, zeros, *, bits, group_size, symmetric, bias=None, out=None, config=None):
    """``x @ dequantize(packed, scales, zeros)^T (+ bias)`` in x's dtype, accumulated in fp32.

    x: (..., K) fp16/bf16/fp32; K is x.shape[-1]. M = prod(x.shape[:-1]) <= 16 takes the decode
    kernel, larger M the tiled tensor-core kernel (``launch_plan`` says which). ``out``: optional
    preallocated contiguous (..., N) tensor of x's dtype. ``config``: ``None`` autotunes (Triton's
    autotuner, cached per key in this process); a dict of the variant's meta-parameters plus
    ``num_warps`` and ``num_stages`` (``CONFIG_KEYS``; what ``chosen_config`` returns) launches exactly
    that config without searching. This file never reads a config from disk: callers keep them
    (``triton_kernels.nn`` reads per-GPU tables).
    """
    K, N = _check_call(x, packed, scales, zeros, bits, group_size, symmetric, bias, out)
    _check_launchable(x, "dequant_matmul")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # a view for sliced/offset x whenever reshape can view it
    M = x2.shape[0]
    variant, m_bucket = launch_plan(M, N, x.dtype, x.device)
    fixed = None if config is None else check_config(config, variant)
    if out is None:
        out = torch.empty((*lead, N), device=x.device, dtype=x.dtype)
    out2 = out.view(M, N)
    if M == 0:
        return out
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    plane_meta = plane_args(K, bits)  # the plane sizes (runtime ints) come out, the constexprs stay
    plane_sizes = [plane_meta.pop(k) for k in ("WPR", "P1_WORD0", "P1_SHIFT", "P2_WORD0", "P2_SHIFT")]
    zeros_arg = scales if (symmetric or zeros is None) else zeros  # unused when SYMMETRIC
    bias_arg = bias if bias is not None else scales  # unused when not HAS_BIAS
    param_strides = (scales.stride(0), scales.stride(1), zeros_arg.stride(0), zeros_arg.stride(1))
    common = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=bias is not None,
                  EMULATE_BF16_DOT=_interpreting() and x.dtype == torch.bfloat16, **plane_meta, **(fixed or {}))
    if variant != "matmul":
        split = variant == "gemv_split"
        ws = torch.zeros((M, N), device=x.device, dtype=torch.float32) if split else out2
        kernel = dequant_gemv_kernel if fixed else _AUTOTUNERS[variant]
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"], triton.cdiv(M, m_bucket))  # noqa: E731
        kernel[grid](
            x2, packed, scales, zeros_arg, bias_arg, out2, ws,
            M, N, K, *plane_sizes,
            x2.stride(0), x2.stride(1), packed.stride(0), *param_strides, out2.stride(0), ws.stride(0),
            BLOCK_M=m_bucket, **common)
        if split:
            out2.copy_(ws)  # the cast to the activation dtype, after all K splits have landed
    else:
        kernel = dequant_matmul_kernel if fixed else _matmul_autotuned
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        kernel[grid](
            x2, packed, scales, zeros_arg, bias_arg, out2,
            M, N, K, m_bucket, *plane_sizes,
            x2.stride(0), x2.stride(1), packed.stride(0), *param_strides, out2.stride(0), out2.stride(1),
            **common)
    return out


# ----------------------------------------------------------------------------------------------
# Pure-torch references
# ----------------------------------------------------------------------------------------------
def dequantize(packed, scales, zeros, *, bits, group_size, K, symmetric):
    """fp32 (N, K) weights, by the definition in the module docstring (the kernels match it bit for bit)."""
    check_weight(packed, scales, zeros, bits, group_size, K, symmetric)
    q = unpack(packed, bits, K).float()
    gs = K if group_size == -1 else group_size
    s = scales.float().repeat_interleave(gs, dim=1)[:, :K]
    if symmetric:
        return (q - float(2 ** (bits - 1))) * s
    z = zeros.float().repeat_interleave(gs, dim=1)[:, :K]
    return (q - z) * s


def dequant_matmul_reference(x, packed, scales, zeros, *, bits, group_size, symmetric, bias=None, out=None):
    """Same contract as ``dequant_matmul``; the product and bias in float64, rounded once to x's dtype."""
    K, N = _check_call(x, packed, scales, zeros, bits, group_size, symmetric, bias, out)
    w = dequantize(packed, scales, zeros, bits=bits, group_size=group_size, K=K, symmetric=symmetric)
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------------------------
# Packing and compression helpers
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


def quantize_rtn(w, bits, group_size, symmetric):
    """Round-to-nearest quantization of a float (N, K) weight -> (q uint8, scales fp32, zeros fp32 or None).

    Asymmetric: the group's range is widened to include 0, s = (max - min) / (2^bits - 1),
    z = round(-min / s) (integer-valued), q = clamp(round(w / s) + z). Symmetric:
    s = 2 * max|w| / (2^bits - 1), q = clamp(round(w / s) + 2^(bits-1)); zeros is None.
    An all-zero group gets s = 1. Every weight then dequantizes to within s/2 of itself.
    """
    check_bits(bits)
    check_group_size(group_size)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError("w must be a floating-point torch.Tensor of shape (N, K)")
    if w.dim() != 2 or w.shape[1] < 1:
        raise ValueError(f"w must be 2-D (N, K) with K >= 1, got shape {tuple(w.shape)}")
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    G = _num_groups(K, group_size)
    wf = w.float()
    # Pad the partial last group by repeating its last element so min/max see only real weights.
    pad = G * gs - K
    wp = torch.cat([wf, wf[:, -1:].expand(N, pad)], dim=1) if pad else wf
    wg = wp.view(N, G, gs)
    qmax = 2 ** bits - 1
    if symmetric:
        amax = wg.abs().amax(dim=2)
        s = 2 * amax / qmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        zero = float(2 ** (bits - 1))
        q = torch.clamp(torch.round(wg / s[:, :, None]) + zero, 0, qmax)
        zeros = None
    else:
        lo = wg.amin(dim=2).clamp(max=0)
        hi = wg.amax(dim=2).clamp(min=0)
        s = (hi - lo) / qmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        zeros = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = torch.clamp(torch.round(wg / s[:, :, None]) + zeros[:, :, None], 0, qmax)
    q = q.view(N, G * gs)[:, :K].to(torch.uint8).contiguous()
    return q, s.contiguous(), zeros


_GGUF_BLOCKS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights


def from_gguf(data, qtype, shape):
    """One GGUF tensor's raw blocks -> keyword arguments for ``dequantize`` / ``dequant_matmul``.

    data: uint8 array (numpy, e.g. ``GGUFReader(...).tensors[i].data``, or torch) of the tensor's
    block bytes; qtype: "Q4_0", "Q4_1" or "Q8_0" (or a GGMLQuantizationType); shape: (N, K), i.e.
    GGUF's dims reversed (ne0 = K). Blocks are 32 weights of one row, so group_size = 32:

    - Q4_0 (fp16 d, 16 bytes of nibbles; w = (q - 8) d): symmetric 4-bit, scales = d. Exact.
    - Q8_0 (fp16 d, 32 int8; w = q d): codes q + 128, symmetric 8-bit, scales = d. Exact.
    - Q4_1 (fp16 d, fp16 m, nibbles; w = q d + m): asymmetric 4-bit, scales = d (fp16), float zeros
      z = -m / d rounded to fp32, so w = (q - z) d agrees with gguf to a few fp32 roundings of
      |m| + 15 |d|. A block with d == 0 (all weights equal m) is stored exactly instead as codes 0,
      scale m, zero -1: (0 - (-1)) * m = m.
    Nibble order in every 4-bit block: low nibbles are elements 0..15, high nibbles 16..31.
    """
    name = getattr(qtype, "name", qtype)
    if name not in _GGUF_BLOCKS:
        raise ValueError(f"qtype must be one of {sorted(_GGUF_BLOCKS)}, got {qtype!r}")
    if len(shape) != 2 or any(isinstance(d, bool) or int(d) != d or d < 1 for d in shape):
        raise ValueError(f"shape must be (N, K) with positive ints, got {shape!r}")
    N, K = int(shape[0]), int(shape[1])
    if K % 32:
        raise ValueError(f"shape K={K} must be a multiple of the GGUF block size 32")
    raw = data if isinstance(data, torch.Tensor) else torch.from_numpy(data.reshape(-1).copy())
    if raw.dtype != torch.uint8:
        raise TypeError(f"data must hold uint8 block bytes, got {raw.dtype}")
    raw = raw.reshape(-1)
    bsz = _GGUF_BLOCKS[name]
    nblk = N * (K // 32)
    if raw.numel() != nblk * bsz:
        raise ValueError(f"data has {raw.numel()} bytes, but a {name} tensor of shape (N={N}, K={K}) "
                         f"needs {nblk * bsz}")
    blocks = raw.view(nblk, bsz)
    d = blocks[:, 0:2].contiguous().view(torch.float16).view(N, K // 32)
    if name == "Q8_0":
        q = (blocks[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).view(N, K)
        return dict(packed=pack(q, 8), scales=d.contiguous(), zeros=None, bits=8, group_size=32,
                    symmetric=True)
    nib = blocks[:, 4:] if name == "Q4_1" else blocks[:, 2:]
    q = torch.cat([nib & 0x0F, nib >> 4], dim=1).view(N, K)  # low nibbles first, then high
    if name == "Q4_0":
        return dict(packed=pack(q, 4), scales=d.contiguous(), zeros=None, bits=4, group_size=32,
                    symmetric=True)
    m = blocks[:, 2:4].contiguous().view(torch.float16).view(N, K // 32)
    flat = d == 0
    zeros = torch.where(flat, torch.full_like(m, -1.0, dtype=torch.float32),
                        (-m.double() / torch.where(flat, 1.0, d.double())).float())
    scales = torch.where(flat, m, d)
    q = torch.where(flat.repeat_interleave(32, dim=1), torch.zeros_like(q), q)
    return dict(packed=pack(q, 4), scales=scales.contiguous(), zeros=zeros.contiguous(), bits=4,
                group_size=32, symmetric=False)
