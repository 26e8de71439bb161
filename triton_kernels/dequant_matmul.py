"""Weight-only quantized linear: ``y = x @ dequant(W)^T (+ bias)`` with 1-8-bit packed weights.

What it computes
----------------
``W`` has shape (N, K) and is stored as integer codes ``q`` in [0, 2^bits) with one scale ``s`` and
(for asymmetric grids) one zero point ``z`` per group of ``group_size`` consecutive weights of a row
(``group_size=-1``: one group per row, i.e. per-channel). Dequantization is defined in fp32, exactly
as ``dequantize`` computes it and bit-for-bit what both kernels compute::

    asymmetric:  w = (q.float() - z.float()) * s.float()           # z may be any float (GGUF Q4_1)
    symmetric:   w = (q.float() - 2**(bits-1)) * s.float()         # zeros ignored (may be None)

(a subtraction then a multiplication, two IEEE roundings, which no compiler may contract into an FMA).

Shapes and dtypes
-----------------
- ``x``: (..., K), fp16 / bf16 / fp32, any strides in the leading dims' flattening that ``reshape``
  can view; accumulation is fp32, the output (..., N) has x's dtype. fp32 activations use
  ``input_precision="ieee"`` (no tf32), so fp32 results stay fp32-accurate; they always take the
  split-K kernel (16 rows per program), since ieee fp32 dot tiles large enough for prefill spill.
- ``packed``: int32 (N, ceil(K * bits / 32)); ``scales``/``zeros``: (N, ceil(K / group_size)),
  fp16 / bf16 / fp32 (each may differ); ``bias``: (N,), any float dtype, added in fp32.
- ``group_size``: -1 or a power of two (16 ... 256 are the tuned ones); K need not be a multiple of it
  (the last group is partial) nor of any block size.

Storage layout of ``packed`` (binding: QuantLinear and ``from_gguf`` build on it)
-------------------------------------------------------------------------------
Each row of codes is an LSB-first bit stream: code j occupies stream bits [j*bits, (j+1)*bits) with
its least significant bit first, and stream bit i lives in bit (i % 32) of int32 word i // 32 of that
row. Rows are padded with zero bits up to a whole word, so a weight costs exactly ``bits`` bits.
A code may straddle two words. Example, bits=3 (codes c0, c1, ...; digits are the code's bit index)::

    word 0, bit 31 ............................................ bit 0
           [c10:1 0][c9:2 1 0][c8 ] ... [c2:2 1 0][c1:2 1 0][c0:2 1 0]
    word 1, bit 31 ............................................ bit 0
           ...  [c11:2 1 0][c10:2]        <- c10's bit 2 spills into word 1's bit 0

For bits=4 this is the familiar 8 codes per word, code j at shift 4*(j % 8); for bits=8, 4 per word.

Two kernel paths
----------------
- ``dequant_gemv_kernel`` (decode, M <= 16): a split-K kernel. Each program owns BLOCK_N output
  columns and every SPLIT_K-th K block. Each code gathers the word(s) holding it (a second word
  only where a code straddles, i.e. never for 1/2/4/8 bits); consecutive codes of a row sit on
  consecutive lanes, so a warp's loads fall in the same sectors and each packed byte comes from
  DRAM once. Unpacking and dequantization happen in registers. The per-element pointers cost
  registers, which is why the tiles are small (see ``gemv_configs``). For M == 1 it
  reduces with ``tl.sum`` (no padding to a 16-row MMA), for 2 <= M <= 16 with one ``tl.dot`` on a
  16-row tile. Partial sums go through ``tl.atomic_add`` into an fp32 workspace (M, N) that the
  launcher zeroes and finally casts to the activation dtype; fp32 atomics exist on every target and
  in the interpreter, and the workspace keeps fp16/bf16 outputs from being summed in low precision.
  The bias is added by the K-split 0 programs only.
- ``dequant_matmul_kernel`` (prefill, M > 16): a tiled ``tl.dot`` kernel with grouped program order,
  full K loop per program, fused bias, output stored directly in the activation dtype.

Under the interpreter with bf16 activations the kernels emulate the bf16 ``tl.dot`` in fp32
(``EMULATE_BF16_DOT``): Triton's interpreter (3.6-3.9) multiplies bf16's uint16 storage as integers and
truncates fp32 -> bf16 casts. The emulation rounds to bf16 exactly as the GPU does, so it tests
the same arithmetic; compiled kernels never take that branch.

K is inferred from x in ``dequant_matmul`` and checked against packed/scales/zeros; two K that
need the same number of words and groups (e.g. 40 and 41 at 3 bits, group 16) cannot be told apart
from the shapes, so pass the K the weight was packed with.

Each kernel is autotuned over configs from a factory (``gemv_configs`` / ``matmul_configs``); the key
covers the M bucket, N, K, bits, group size, symmetry and (added by Triton) the tensor dtypes. Under
``TRITON_INTERPRET=1`` the factories return one small config (the interpreter cannot benchmark).
The GPU design target is ~3.9x over fp16 for 4-bit at M <= 16 on a memory-bound GPU; no GPU was
available while writing this file, so that is a target, not a measurement.

Public API: ``pack``, ``unpack``, ``dequantize``, ``dequant_matmul``, ``dequant_matmul_reference``,
``quantize_rtn``, ``from_gguf``. Imports only torch and triton (copy the file alone).
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


def gemv_configs(interpret: bool | None = None) -> list:
    """Autotune configs of the decode (split-K) kernel; one small config under the interpreter.

    The full list is what the compile check compiles for sm_80/sm_90/gfx942.
    """
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        # SPLIT_K=2 so the interpreter exercises the atomic split-K reduction too.
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4, num_stages=1)]
    # Every element of a weight tile carries its own gather pointer(s) (codes may straddle words),
    # so register use grows with BLOCK_N * BLOCK_K per thread. The compile check (sm_80/sm_90/gfx942,
    # 3-bit group 32 = the heaviest variant) spilled at 64 tile elements per thread (e.g. 64x128 with
    # 4 warps) and also 64x128 with 8 warps on gfx942; 16x256 / 4 warps and 32x128 / 8 warps are clean.
    out = []
    for bn, bk, sk, warps in [
        (16, 256, 1, 4),
        (16, 256, 4, 4),
        (16, 256, 16, 4),
        (32, 128, 1, 8),
        (32, 128, 8, 8),
        (16, 64, 4, 4),  # the only tile here that fp32 activations fit at BLOCK_M=16 (see fp32_configs)
    ]:
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps, num_stages=2))
    return out


def matmul_configs(interpret: bool | None = None) -> list:
    """Autotune configs of the prefill (tiled tl.dot) kernel; one small config under the interpreter."""
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    # Same per-thread budget as gemv_configs for the [BLOCK_N, BLOCK_K] dequantized tile plus the
    # accumulator: the compile check spilled 128x64x32, 64x128x32 and 32x64x64 with 4 warps and
    # 128x256x32 with 8 (3-bit group 32), on gfx942 also 64x128x32 and 32x64x64 with 8 warps, and
    # passed 128x128x32 / 8 warps and 64x64x64 / 4 warps everywhere.
    out = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 32, 8, 3),
        (64, 64, 64, 4, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


def fp32_configs(configs):
    """The decode configs fp32 activations may use with BLOCK_M=16: an ieee fp32 tl.dot has no
    tensor-core path and is register-hungry. The compile check (sm_90, 3-bit group 32) spilled
    16x256, 32x128, 32x64 and 16x128 tiles and passed 16x64; the prefill kernel spilled even at
    32x32x32, so fp32 activations never take it."""
    return [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 1024] or configs[-1:]


def _prune_gemv(configs, named_args, **kwargs):
    """Drop K splits with nothing to do and K blocks wider than the whole row; keep at least one."""
    args = {**named_args, **kwargs}
    K = args["K"]
    if args["BLOCK_M"] > 1 and args["x_ptr"].dtype == torch.float32:
        configs = fp32_configs(configs)
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))
            and c.kwargs["SPLIT_K"] <= triton.cdiv(K, c.kwargs["BLOCK_K"])]
    return kept or configs[:1]


def _prune_matmul(configs, named_args, **kwargs):
    """Drop tiles taller than the M bucket (pure padding) or wider than N / K; keep at least one."""
    args = {**named_args, **kwargs}
    m_bucket, N, K = args["M_BUCKET"], args["N"], args["K"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(32, m_bucket)
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))]
    return kept or configs[:1]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, N, K,
                  stride_pn, stride_sn, stride_sg, stride_zn, stride_zg, k_start,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """fp32 tile [BLOCK_N, BLOCK_K] of dequantized weights (k = k_start + arange); zero outside (N, K)."""
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    bitpos = offs_k * BITS  # int32 is enough: a row holds < 2^31 bits
    word = bitpos // 32
    shift = (bitpos % 32).to(tl.uint32)
    ptrs = packed_ptr + offs_n[:, None] * stride_pn + word[None, :]  # [BN, BK]
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)  # unsigned: logical shifts
    q = lo >> shift[None, :]
    if 32 % BITS != 0:
        # Only straddling codes read the next word (it may not exist for the others).
        straddle = (shift + BITS) > 32
        hi = tl.load(ptrs + 1, mask=mask & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
        # Two shifts: one shift by (32 - shift) would be a shift by 32 (undefined) when shift == 0.
        q = q | ((hi << 1) << (31 - shift[None, :]))
    q = q & ((1 << BITS) - 1)
    qf = q.to(tl.float32)  # [BN, BK]

    if GROUP_SIZE == -1:
        # One group per row.
        s = tl.load(scales_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if not SYMMETRIC:
            z = tl.load(zeros_ptr + offs_n * stride_zn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    elif GROUP_SIZE >= BLOCK_K:
        # Both powers of two and k_start a multiple of BLOCK_K: the tile lies inside one group,
        # so one scale per row (a [BN] load instead of a [BN, BK] gather).
        g = k_start // GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
        s = s.to(tl.float32)[:, None]
        if not SYMMETRIC:
            z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0)
            z = z.to(tl.float32)[:, None]
    else:
        g = offs_k // GROUP_SIZE
        s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                    mask=mask, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg,
                        mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        w = (qf - (1 << (BITS - 1))) * s
    else:
        w = (qf - z) * s
    # Outside (N, K) the tile must be exactly 0 even if a scale is inf/NaN (0 * inf = NaN).
    return tl.where(mask, w, 0.0)


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
def dequant_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, ws_ptr,
    # sizes
    M, N, K,
    # strides: x (M, K); packed (N, words); scales, zeros (N, groups); fp32 workspace (M, N)
    stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_zn, stride_zg, stride_wm,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr = False,  # interpreter only, see _dot_acc
):
    """Decode path: ws[m, n] += sum over this program's K blocks of x[m, k] * w[n, k] (split-K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)  # > 0 only for fp32 activations with M > 16 (see dequant_matmul)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    for kb in range(pid_k, num_kb, SPLIT_K):
        k_start = kb * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, N, K,
                          stride_pn, stride_sn, stride_sg, stride_zn, stride_zg, k_start,
                          BITS, GROUP_SIZE, SYMMETRIC, BLOCK_K)  # [BN, BK] fp32
        if BLOCK_M == 1:
            # M == 1: a register reduction; padding to a 16-row MMA would waste 15/16 of it.
            x = tl.load(x_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            acc += tl.sum(w * x[None, :], axis=1)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)  # [BM, BN]
    if HAS_BIAS:
        first_split = tl.full([BLOCK_N], pid_k, tl.int32) == 0  # only split 0 adds the bias
        b = tl.load(bias_ptr + offs_n, mask=mask_n & first_split, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc += b
        else:
            acc += b[None, :]
    if BLOCK_M == 1:
        tl.atomic_add(ws_ptr + offs_n, acc, mask=mask_n)
    else:
        tl.atomic_add(ws_ptr + offs_m[:, None] * stride_wm + offs_n[None, :], acc,
                      mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def dequant_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET is only an autotune key: next power of two of M)
    M, N, K, M_BUCKET,
    # strides: x (M, K); packed (N, words); scales, zeros (N, groups); out (M, N)
    stride_xm, stride_xk, stride_pn, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = _dequant_tile(packed_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, N, K,
                          stride_pn, stride_sn, stride_sg, stride_zn, stride_zg, k_start,
                          BITS, GROUP_SIZE, SYMMETRIC, BLOCK_K)  # [BN, BK] fp32
        acc = _dot_acc(x, w, acc, EMULATE_BF16_DOT)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16_DOT:
        acc = _round_to_bf16(acc)  # the interpreter's own fp32 -> bf16 store would truncate
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_gemv_autotuned = triton.autotune(
    configs=gemv_configs(), key=["BLOCK_M", "N", "K", "BITS", "GROUP_SIZE", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    reset_to_zero=["ws_ptr"],  # benchmarking re-runs the atomics into the same workspace
)(dequant_gemv_kernel)

_matmul_autotuned = triton.autotune(
    configs=matmul_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune_matmul},
)(dequant_matmul_kernel)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
# True when the kernels above were defined under TRITON_INTERPRET=1 (Triton reads it when each
# ``@triton.jit`` runs, so setting it after this module is imported changes nothing).
_INTERPRETED = not isinstance(dequant_gemv_kernel, triton.runtime.JITFunction)


def _check_launchable(x: torch.Tensor, fn: str) -> None:
    """A clear error for CPU tensors without the interpreter (Triton's own: "0 active drivers")."""
    if x.device.type != "cpu" or _INTERPRETED:
        return
    late = (" (TRITON_INTERPRET=1 is set now, but was not when this module was imported)"
            if os.environ.get("TRITON_INTERPRET") == "1" else "")
    raise RuntimeError(
        f"{fn}: x is a CPU tensor, and the Triton kernels need a CUDA/ROCm GPU. Move the tensors to "
        f"the GPU, or set TRITON_INTERPRET=1 before this module is imported to run the kernels in "
        f"Triton's interpreter on CPU (slow: for tests){late}. For CPU inference use QuantLinear "
        f"(triton_kernels.nn; its CPU backends run torch's kernels), or dequant_matmul_reference (pure torch).")


def _num_words(K: int, bits: int) -> int:
    return (K * bits + 31) // 32


def _num_groups(K: int, group_size: int) -> int:
    return 1 if group_size == -1 else (K + group_size - 1) // group_size


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _check_group_size(group_size) -> None:
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


def _check_weight(packed, scales, zeros, bits, group_size, K, symmetric):
    """Validates the quantized weight; returns N."""
    _check_bits(bits)
    _check_group_size(group_size)
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
        _check_bits(bits)
        if packed.shape[1] != _num_words(K, bits):
            raise ValueError(f"K mismatch: x has K={K} (x.shape[-1]), which at bits={bits} needs "
                             f"{_num_words(K, bits)} packed words per row, but packed has {packed.shape[1]}")
    N = _check_weight(packed, scales, zeros, bits, group_size, K, symmetric)
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
def dequant_matmul(x, packed, scales, zeros, *, bits, group_size, symmetric, bias=None, out=None):
    """``x @ dequantize(packed, scales, zeros)^T (+ bias)`` in x's dtype, accumulated in fp32.

    x: (..., K) fp16/bf16/fp32; K is x.shape[-1]. M = prod(x.shape[:-1]) <= 16 takes the split-K
    decode kernel, larger M the tiled tensor-core kernel. ``out``: optional preallocated
    contiguous (..., N) tensor of x's dtype.
    """
    K, N = _check_call(x, packed, scales, zeros, bits, group_size, symmetric, bias, out)
    _check_launchable(x, "dequant_matmul")
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
    zeros_arg = scales if (symmetric or zeros is None) else zeros  # unused when SYMMETRIC
    bias_arg = bias if bias is not None else scales  # unused when not HAS_BIAS
    sg = scales.stride(1)
    zn, zg = zeros_arg.stride(0), zeros_arg.stride(1)
    common = dict(BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=symmetric, HAS_BIAS=bias is not None,
                  EMULATE_BF16_DOT=_interpreting() and x.dtype == torch.bfloat16)
    if M <= GEMV_MAX_M or x.dtype == torch.float32:
        # fp32 activations take the split-K kernel at every M, 16 rows per program along grid axis 2:
        # no ieee fp32 tl.dot tile big enough for the prefill kernel compiles without spills.
        ws = torch.zeros((M, N), device=x.device, dtype=torch.float32)
        block_m = 1 if M == 1 else 16
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"], triton.cdiv(M, block_m))  # noqa: E731
        _gemv_autotuned[grid](
            x2, packed, scales, zeros_arg, bias_arg, ws,
            M, N, K,
            x2.stride(0), x2.stride(1), packed.stride(0), scales.stride(0), sg, zn, zg, ws.stride(0),
            BLOCK_M=block_m, **common)
        out2.copy_(ws)  # the cast to the activation dtype, after all K splits have landed
    else:
        m_bucket = min(triton.next_power_of_2(M), 4096)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _matmul_autotuned[grid](
            x2, packed, scales, zeros_arg, bias_arg, out2,
            M, N, K, m_bucket,
            x2.stride(0), x2.stride(1), packed.stride(0), scales.stride(0), sg, zn, zg,
            out2.stride(0), out2.stride(1),
            **common)
    return out


# ----------------------------------------------------------------------------------------------
# Pure-torch references
# ----------------------------------------------------------------------------------------------
def dequantize(packed, scales, zeros, *, bits, group_size, K, symmetric):
    """fp32 (N, K) weights, by the definition in the module docstring (the kernels match it bit for bit)."""
    _check_weight(packed, scales, zeros, bits, group_size, K, symmetric)
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
def pack(q, bits):
    """Codes (N, K) in [0, 2^bits) -> int32 (N, ceil(K*bits/32)) LSB-first bit streams (see docstring)."""
    _check_bits(bits)
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
    # The stream repeats every 32 codes (= `bits` words): place each of those 32 codes with
    # constant word/shift, vectorised over rows and periods (no per-bit tensor: memory stays ~8x q).
    P = (K + 31) // 32
    qp = torch.zeros((N, P * 32), dtype=torch.int64, device=q.device)
    qp[:, :K] = q
    qp = qp.view(N, P, 32)
    words = torch.zeros((N, P, bits), dtype=torch.int64, device=q.device)
    for c in range(32):
        w, s = divmod(c * bits, 32)
        words[:, :, w] |= (qp[:, :, c] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[:, :, w + 1] |= qp[:, :, c] >> (32 - s)
    words = words.view(N, P * bits)[:, :_num_words(K, bits)]
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement into int32
    return words.to(torch.int32).contiguous()


def unpack(packed, bits, K):
    """Inverse of ``pack``: int32 (N, ceil(K*bits/32)) -> uint8 codes (N, K)."""
    _check_bits(bits)
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
    P = (K + 31) // 32
    words = torch.zeros((N, P * bits), dtype=torch.int64, device=packed.device)
    words[:, :packed.shape[1]] = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(N, P, bits)
    q = torch.empty((N, P, 32), dtype=torch.int64, device=packed.device)
    mask = 2 ** bits - 1
    for c in range(32):
        w, s = divmod(c * bits, 32)
        v = words[:, :, w] >> s
        if s + bits > 32:
            v = v | (words[:, :, w + 1] << (32 - s))
        q[:, :, c] = v & mask
    return q.view(N, P * 32)[:, :K].to(torch.uint8).contiguous()


def quantize_rtn(w, bits, group_size, symmetric):
    """Round-to-nearest quantization of a float (N, K) weight -> (q uint8, scales fp32, zeros fp32 or None).

    Asymmetric: the group's range is widened to include 0, s = (max - min) / (2^bits - 1),
    z = round(-min / s) (integer-valued), q = clamp(round(w / s) + z). Symmetric:
    s = 2 * max|w| / (2^bits - 1), q = clamp(round(w / s) + 2^(bits-1)); zeros is None.
    An all-zero group gets s = 1. Every weight then dequantizes to within s/2 of itself.
    """
    _check_bits(bits)
    _check_group_size(group_size)
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
