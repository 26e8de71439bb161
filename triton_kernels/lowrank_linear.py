"""Rank-r factored linear layer: ``y = (x @ V^T) @ U^T (+ bias)``.

Shapes: x (..., K), any leading batch dims (flattened to M rows); U (N, r) and V (r, K), the factors of
a weight W ~= U @ V of shape (N, K); bias optional (N,); y (..., N) in x's dtype.

Dtypes: x, U, V (and bias) share one dtype, fp16 / bf16 / fp32; products accumulate in fp32, and fp32
uses ``input_precision="ieee"`` (no tf32), as torch's default matmul. The (M x r) intermediate
``t = x @ V^T`` is rounded to the activation dtype before the second product, in both paths, as
``F.linear(F.linear(x, V), U)`` does; ``lowrank_linear_reference`` models exactly this rounding.

Two paths, chosen by rank (``path="auto"``; why these, in full: docs/kernels.md):
- fused (r <= FUSED_AUTO_MAX_RANK = 128, forced up to FUSED_MAX_RANK = 256): one launch; a program
  computes t for BLOCK_M rows over all of K, r padded to R_PAD (a power of two >= 16) in registers, and
  reuses it for every n_split-th output tile of its row block (n_split: about one wave of programs).
- two_gemm (r > 128): two launches of one autotuned ``tl.dot`` GEMM, t through global memory.

Limits: any M, N, K, r >= 1 (masked tails); any strides for x (rows), U, V; y is contiguous. Offsets
are int32: each operand must have fewer than 2**31 elements. Under ``TRITON_INTERPRET=1`` every config
list collapses to one config (the autotuner cannot benchmark); ``fused_configs`` / ``matmul_configs``
with ``interpret=False`` return the full lists (what the compile check compiles).

Imports only torch and triton: copy the file alone.
"""
import os

import torch
import triton
import triton.language as tl

FUSED_AUTO_MAX_RANK = 128  # path="auto" uses the fused kernel up to this rank
FUSED_MAX_RANK = 256  # path="fused" is refused above this (R_PAD=256 already needs BLOCK_M <= 64)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Config factories and pruning
# ----------------------------------------------------------------------------------------------
# Every config below compiles without spills within each target's shared-memory limit for bf16: the
# lowrank_* rows of results/compile_check.csv; the tiles left out and why: docs/kernels.md, "Tile choices".

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per R_PAD bucket: the larger R_PAD, the larger
# the fp32 t accumulator (BLOCK_M x R_PAD), so BLOCK_M and BLOCK_K shrink as R_PAD grows.
_FUSED = {
    64: [(16, 64, 128, 4, 3), (32, 64, 128, 4, 2), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)],
    128: [(16, 64, 64, 4, 3), (32, 64, 64, 4, 2), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3)],
    256: [(16, 64, 32, 4, 3), (32, 64, 32, 4, 2), (64, 64, 32, 8, 2)],
}
# Small blocks under the interpreter: its cost is per (program x loop iteration), and the tests use
# N, K of 40-300 so that masked tails are exercised.
_INTERPRET_CONFIG = (16, 32, 32, 4, 1)


def _r_bucket(r_pad: int) -> int:
    return 64 if r_pad <= 64 else r_pad


def _config(blocks) -> triton.Config:
    bm, bn, bk, warps, stages = blocks
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def fused_configs(r_pad: int | None = None, interpret: bool | None = None) -> list[triton.Config]:
    """Autotune configs of ``lowrank_fused_kernel``: for one R_PAD, or for all buckets (None)."""
    if _interpreting() if interpret is None else interpret:
        return [_config(_INTERPRET_CONFIG)]
    buckets = [_r_bucket(r_pad)] if r_pad is not None else list(_FUSED)
    return [_config(b) for k in buckets for b in _FUSED[k]]


def _prune_fused(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    allowed = {(b[0], b[1], b[2], b[3], b[4]) for b in _FUSED[_r_bucket(kwargs["R_PAD"])]}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                   c.num_warps, c.num_stages) in allowed]


_MATMUL = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (32, 64, 32, 4, 4),
    # Small M (decode): wide N tiles.
    (16, 128, 64, 8, 3),
    (16, 64, 64, 4, 4),
]


def matmul_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Autotune configs of ``lowrank_matmul_kernel`` (the two-GEMM path)."""
    if _interpreting() if interpret is None else interpret:
        return [_config(_INTERPRET_CONFIG)]
    return [_config(b) for b in _MATMUL]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=fused_configs(), key=["M", "N", "K", "R_PAD"],
                 prune_configs_by={"early_config_prune": _prune_fused})
@triton.jit
def lowrank_fused_kernel(
    # pointers
    x_ptr, u_ptr, v_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk,
    stride_un, stride_ur,
    stride_vr, stride_vk,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_split = tl.num_programs(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # Phase 1: t = x[rows] @ V^T, the padded ranks r >= R load as 0 so they contribute nothing.
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr  # V^T tile
    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        v = tl.load(v_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BK, R_PAD]
        if DOT_UPCAST:
            x = x.to(tl.float32)
            v = v.to(tl.float32)
        t = tl.dot(x, v, t, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += BLOCK_K * stride_vk
    # Rounded to the activation dtype (see module docstring): tensor-core second product, and the
    # same numbers the two-GEMM path writes to memory.
    t_lo = t.to(y_ptr.dtype.element_ty)  # [BM, R_PAD]
    if DOT_UPCAST:
        t_lo = t_lo.to(tl.float32)

    # Phase 2: every n_split-th output tile of this row block reuses t.
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(pid_n, num_n_tiles, n_split):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        u_ptrs = u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un  # U^T tile
        u = tl.load(u_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [R_PAD, BN]
        if DOT_UPCAST:
            u = u.to(tl.float32)
        acc = tl.dot(t_lo, u, input_precision="ieee")  # [BM, BN] fp32
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc += b.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=matmul_configs(), key=["M", "N", "K"])
@triton.jit
def lowrank_matmul_kernel(
    # pointers: c = a @ b^T (+ bias)
    a_ptr, b_ptr, bias_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    # Grouped ordering: GROUP_M row blocks share each column block of b while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # b^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# True when the kernels above were defined under TRITON_INTERPRET=1 (Triton reads it when each
# ``@triton.jit`` runs, so setting it after this module is imported changes nothing).
_INTERPRETED = not isinstance(lowrank_fused_kernel.fn, triton.runtime.JITFunction)  # .fn: under autotune
# What a CPU caller can use instead (named in _check_launchable's error).
_CPU_ALTERNATIVES = ("LowRankLinear (triton_kernels.nn; its CPU backends run torch's kernels), "
                     "or lowrank_linear_reference (pure torch)")


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


def _check_inputs(x, U, V, bias):
    for name, t in (("x", x), ("U", U), ("V", V)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U must be (N, r) and V must be (r, K); got U {tuple(U.shape)}, V {tuple(V.shape)}")
    if U.shape[1] != V.shape[0]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} disagree on the rank: "
                         f"U.shape[1] must equal V.shape[0]")
    if U.shape[1] < 1:
        raise ValueError(f"rank must be >= 1; U has shape {tuple(U.shape)}")
    if x.dim() < 1 or x.shape[-1] != V.shape[1]:
        raise ValueError(f"x must have last dim K = V.shape[1] = {V.shape[1]}; got x {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != U.shape[0]):
        raise ValueError(f"bias must have shape ({U.shape[0]},) = (N,); got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x.dtype must be one of {_DTYPES}; got {x.dtype}")
    for name, t in (("U", U), ("V", V)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must equal x.dtype ({x.dtype})")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")


def _dot_upcast(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.6-3.9) returns garbage (errors ~1e10) from tl.dot on bfloat16 operands
    # (it multiplies their uint16 storage). bf16 x bf16 products are exact in fp32 (8+8 significant
    # bits < 24), so an fp32 "ieee" dot of the upcast tiles gives what a bf16 tensor-core dot with
    # fp32 accumulation gives. Compiled GPU code never takes this branch.
    return dtype == torch.bfloat16 and _interpreting()


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        # No SMs to fill under the interpreter; 2 programs per row block keep the interpreted
        # program count small while still exercising the strided tile loop.
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_path(rank: int) -> str:
    """The path ``path="auto"`` takes for this rank: "fused" up to FUSED_AUTO_MAX_RANK."""
    return "fused" if rank <= FUSED_AUTO_MAX_RANK else "two_gemm"


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                   *, path: str = "auto", n_split: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = (x @ V^T) @ U^T (+ bias)`` with Triton; see the module docstring.

    path: "auto" (fused for r <= 128, else two GEMMs), "fused" (r <= 256) or "two_gemm".
    n_split: fused path only; programs per row block sharing its output tiles (default: fill the GPU).
    out: optional contiguous result buffer of shape (..., N) and x's dtype/device.
    """
    _check_inputs(x, U, V, bias)
    _check_launchable(x, "lowrank_linear")
    if path not in ("auto", "fused", "two_gemm"):
        raise ValueError(f"path={path!r} is not one of ('auto', 'fused', 'two_gemm')")
    N, R = U.shape
    K = V.shape[1]
    if path == "auto":
        path = choose_path(R)
    if path == "fused" and R > FUSED_MAX_RANK:
        raise ValueError(f"path='fused' supports rank <= {FUSED_MAX_RANK}; got rank {R}: use path='two_gemm'")
    if n_split is not None and (not isinstance(n_split, int) or n_split < 1):
        raise ValueError(f"n_split must be a positive int or None; got {n_split!r}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if out is None:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    else:
        if (not isinstance(out, torch.Tensor) or out.shape != (*lead, N) or out.dtype != x.dtype
                or out.device != x.device or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, N)} on "
                             f"{x.device}; got {getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
        y = out.view(M, N)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y.reshape(*lead, N)
    bias_arg = bias if bias is not None else y  # never read when HAS_BIAS is False

    if path == "fused":
        r_pad = max(16, triton.next_power_of_2(R))
        sms = _num_sms(x.device)

        def grid(META):
            m_tiles = triton.cdiv(M, META["BLOCK_M"])
            n_tiles = triton.cdiv(N, META["BLOCK_N"])
            split = n_split if n_split is not None else triton.cdiv(sms, m_tiles)
            return (m_tiles, max(1, min(split, n_tiles)))

        lowrank_fused_kernel[grid](
            x2, U, V, bias_arg, y,
            M, N, K, R,
            x2.stride(0), x2.stride(1), U.stride(0), U.stride(1), V.stride(0), V.stride(1),
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, R_PAD=r_pad, DOT_UPCAST=_dot_upcast(x.dtype),
        )
    else:
        t = torch.empty((M, R), device=x.device, dtype=x.dtype)
        _matmul(x2, V, None, t)
        _matmul(t, U, bias, y)
    return y.reshape(*lead, N)


def _matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor) -> None:
    """c = a @ b^T (+ bias) into the preallocated ``c`` (a: (M, K), b: (N, K))."""
    M, K = a.shape
    N = b.shape[0]

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

    lowrank_matmul_kernel[grid](
        a, b, bias if bias is not None else c, c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, DOT_UPCAST=_dot_upcast(a.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def lowrank_linear_reference(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch, same numerics contract: fp32 products, t rounded to x.dtype, y rounded to x.dtype."""
    _check_inputs(x, U, V, bias)
    t = (x.float() @ V.float().t()).to(x.dtype)
    y = t.float() @ U.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Factorization helper
# ----------------------------------------------------------------------------------------------
def svd_rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r squared singular values hold at least ``energy`` of the total."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}")
    e = S.double().square()
    total = e.sum()
    if total == 0:
        return 1
    frac = e.cumsum(0) / total
    # The tolerance keeps energy=1.0 from demanding the last rounding-error-sized value.
    return int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype) - 1e-12).item()) + 1


def svd_factors(weight: torch.Tensor, rank: int | None = None, energy: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``weight (N, K) ~= U (N, r) @ V (r, K)``; give exactly one of rank / energy.

    The SVD runs in fp32 (float64 for float64 input); the factors come back in ``weight.dtype``.
    Singular values are split as sqrt(S) into BOTH factors, so U and V have equal scale: that keeps
    fp16 factors far from overflow/underflow and conditions the two rounding steps equally.
    energy: keep the smallest rank holding that fraction of sum(S^2) (the squared Frobenius norm).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (N, K); got {getattr(weight, 'shape', type(weight))}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    n, k = weight.shape
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"rank must be an int; got {type(rank).__name__}")
        if not 1 <= rank <= min(n, k):
            raise ValueError(f"rank must be in [1, min(N, K)] = [1, {min(n, k)}]; got {rank}")
    elif not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}")
    w = weight.detach()
    w = w.double() if w.dtype == torch.float64 else w.float()
    Uf, S, Vh = torch.linalg.svd(w, full_matrices=False)
    r = rank if rank is not None else svd_rank_for_energy(S, energy)
    s = S[:r].sqrt()
    U = (Uf[:, :r] * s[None, :]).to(weight.dtype).contiguous()
    V = (s[:, None] * Vh[:r]).to(weight.dtype).contiguous()
    return U, V
