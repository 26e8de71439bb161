"""Weight quantization on a group-wise integer grid: round-to-nearest (RTN) and GPTQ.

Pure torch, no model knowledge. ``W`` is an ``(N, K)`` float weight in ``nn.Linear`` layout
(out_features x in_features); ``H`` is the ``(K, K)`` calibration second moment ``X^T X / n`` of the
layer's inputs.

The grid is the one of ``triton_kernels/dequant_matmul.py``:

- codes ``q`` are integers in ``[0, 2^bits)``, ``bits`` in 1..8, groups run along K with
  ``group_size`` columns (``-1``: one group per row, i.e. per-channel; otherwise a power of two, as
  the kernels require), the last group may be partial, so ``G = ceil(K / group_size)``;
- asymmetric: ``w = (q - z) * s`` with an **integer** zero-point ``z`` in ``[0, 2^bits)``;
- symmetric: ``w = (q - 2^(bits-1)) * s``.

Parameters of one group (one row, one slice of columns):

- asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``, ``s = (hi - lo) / (2^bits - 1)``,
  ``z = clamp(round(-lo / s), 0, 2^bits - 1)``. Forcing ``lo <= 0 <= hi`` makes 0 exactly
  representable (``q = z``), which is what keeps pruned weights exactly zero when pruning is followed
  by quantization;
- symmetric: ``s = 2 max|w| / (2^bits - 1)`` (the kernel file's choice: the grid spans
  ``[-max|w|, max|w|]`` with all ``2^bits`` codes, so ``+max|w|`` rounds to the clamped top code);
- an all-zero group has ``s = 0``; it is replaced by 1 (every code is then the zero-point, the
  dequantized group is exactly 0, and no division by zero produces NaN).

:func:`rtn` is ``triton_kernels.dequant_matmul.quantize_rtn``; GPTQ needs the same grid one group
slice at a time (:func:`find_params`, :func:`quantize_with_params`), and the tests check that the two
agree bit for bit and that results dequantize like the kernel's ``dequantize(pack(q), ...)``.

GPTQ follows Frantar et al. 2022 ("GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): columns are quantized left to right, the error of each column is spread
over the not-yet-quantized columns with the upper Cholesky factor of ``H^-1`` (computed in float64),
and updates are applied lazily in blocks of ``block_size`` columns.
"""
from __future__ import annotations

import dataclasses

import torch

from .hessian import check_hessian, check_weight, damped_hinv_chol, prepare_hessian

__all__ = [
    "QuantResult",
    "check_quant_args",
    "find_params",
    "quantize_with_params",
    "dequantize_with_params",
    "rtn",
    "gptq",
    "dequantize_result",
]


@dataclasses.dataclass
class QuantResult:
    """Codes and grid of a quantized ``(N, K)`` weight.

    ``q``: uint8 ``(N, K)`` codes in ``[0, 2^bits)``; ``scales``: float32 ``(N, G)``; ``zeros``:
    float32 ``(N, G)`` holding integers in ``[0, 2^bits)`` for asymmetric grids, ``None`` for
    symmetric ones (the dtypes ``quantize_rtn`` returns and ``pack``/``dequantize`` accept).
    """
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def check_quant_args(K: int, *, bits, group_size) -> int:
    """Validate ``bits``/``group_size`` for a layer with ``K`` input features; return the effective
    group size (``K`` for per-channel)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int (-1 for per-channel), got {group_size!r}")
    if group_size == -1:
        return K
    if group_size < 1 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be -1 (per-channel) or a power of two (16, 32, 64, 128, ...) "
                         f"as the dequant kernels require, got {group_size}")
    if group_size > K:
        raise ValueError(
            f"group_size={group_size} does not fit a layer with K={K} input features; "
            f"use a group_size <= {K} or -1 (per-channel)")
    return group_size


def find_params(w: torch.Tensor, *, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters of each row of a weight slice ``w`` (N, g) -> ``(scale (N,), zero (N,))``.

    ``zero`` is float32 holding an integer (``2^(bits-1)`` for symmetric grids) so one formula,
    ``(q - zero) * scale``, dequantizes both kinds.
    """
    w = w.float()
    maxq = 2 ** bits - 1
    if symmetric:
        scale = 2 * w.abs().amax(dim=1) / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / maxq
    # All-zero rows: any positive scale represents them exactly (q == zero).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Codes of ``w`` on the grid ``(scale, zero)`` (broadcasting), as float32 integers."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize_with_params(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def _group_params(W: torch.Tensor, *, bits: int, gs: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of every group of ``W`` -> ``(scales (N, G), zeros (N, G))`` float32.

    The partial last group is padded with zeros; that cannot change its parameters because both
    grids already include 0 in their range.
    """
    N, K = W.shape
    G = -(-K // gs)
    Wp = torch.zeros(N, G * gs, dtype=torch.float32)
    Wp[:, :K] = W
    s, z = find_params(Wp.reshape(N * G, gs), bits=bits, symmetric=symmetric)
    return s.reshape(N, G), z.reshape(N, G)


def _expand(p: torch.Tensor, gs: int, K: int) -> torch.Tensor:
    return p.repeat_interleave(gs, dim=1)[:, :K]


def _make_result(Q: torch.Tensor, scales, zeros, *, bits, group_size, symmetric) -> QuantResult:
    return QuantResult(
        q=Q.to(torch.uint8),
        scales=scales.float().contiguous(),
        zeros=None if symmetric else zeros.float().contiguous(),
        bits=bits, group_size=group_size, symmetric=symmetric)


def _rtn_own(W: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> QuantResult:
    """RTN through :func:`find_params`, the grid GPTQ uses; the tests hold it equal to :func:`rtn`."""
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    s, z = _group_params(W.float(), bits=bits, gs=gs, symmetric=symmetric)
    Q = quantize_with_params(W.float(), _expand(s, gs, K), _expand(z, gs, K), bits=bits)
    return _make_result(Q, s, z, bits=bits, group_size=group_size, symmetric=symmetric)


def rtn(W: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> QuantResult:
    """Round-to-nearest quantization of ``W`` (N, K): ``triton_kernels.dequant_matmul.quantize_rtn``,
    so the harness and the kernels share one grid (the tests check it equals :func:`find_params`)."""
    from triton_kernels.dequant_matmul import quantize_rtn  # lazy: imports triton

    check_weight(W)
    check_quant_args(W.shape[1], bits=bits, group_size=group_size)
    q, scales, zeros = quantize_rtn(W.float(), bits, group_size, symmetric)
    return QuantResult(q=q.to(torch.uint8), scales=scales.float(),
                       zeros=None if symmetric else zeros.float(),
                       bits=bits, group_size=group_size, symmetric=symmetric)


def dequantize_result(r: QuantResult) -> torch.Tensor:
    """Float32 ``(N, K)`` weight represented by ``r``."""
    N, K = r.q.shape
    gs = K if r.group_size == -1 else r.group_size
    s = _expand(r.scales.float(), gs, K)
    if r.symmetric:
        z = torch.full((), float(2 ** (r.bits - 1)))
    else:
        z = _expand(r.zeros.float(), gs, K)
    return dequantize_with_params(r.q.float(), s, z)


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
         act_order: bool = False, damp: float = 0.01, block_size: int = 128,
         mask: torch.Tensor | None = None) -> QuantResult:
    """GPTQ quantization of ``W`` (N, K) given ``H`` (K, K) = X^T X / n.

    - Group parameters are computed when the first column of a group is reached, from the current
      (already error-updated) weights of that group. With ``act_order`` (columns processed in order of
      decreasing ``H_jj``) and groups, parameters are computed up front from the original weights
      ("static groups"), so the result keeps the plain contiguous group layout.
    - ``mask`` (N, K) bool, True = kept: weights where it is False are quantized to the zero-point
      (exactly 0 after dequantization) for prune-then-quantize. Their current value is still forced to
      0 with its error compensated by the later columns (the OBS update of SparseGPT's joint mode), so
      a weight that earlier updates moved away from zero costs nothing extra.
    - Dead inputs (``H_jj == 0``) get zero weights.
    """
    check_weight(W)
    N, K = W.shape
    check_hessian(H, K)
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (N, K) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({N}, {K}) (True = kept), got "
                             f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    W, H, _ = prepare_hessian(W, H, damp)
    keep = torch.ones(N, K, dtype=torch.bool) if mask is None else mask.clone()
    W = torch.where(keep, W, torch.zeros((), dtype=W.dtype))

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    static = None
    if group_size == -1 or act_order:
        # Per-channel: one group, its parameters from the whole (masked) row, as in the paper.
        static = _group_params(W, bits=bits, gs=gs, symmetric=symmetric)
    if perm is not None:
        W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    Hinv = damped_hinv_chol(H, damp).to(torch.float32)

    G = -(-K // gs)
    scales = torch.empty(N, G)
    zeros = torch.empty(N, G)
    if static is not None:
        scales, zeros = static
        col_group = torch.arange(K) // gs if perm is None else perm // gs
    Q = torch.empty(N, K)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty(N, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is None and col % gs == 0:
                # The group's current weights: in-block columns are up to date in W1; columns past
                # the block still owe this block's pending (lazy) update, applied here to a copy.
                g_end = min(col + gs, K)
                part = [W1[:, i:min(i2, g_end) - i1]]
                if g_end > i2:
                    part.append(W[:, i2:g_end] - Err1[:, :i] @ Hinv[i1:col, i2:g_end])
                cur = torch.where(keep[:, col:g_end], torch.cat(part, dim=1), torch.zeros(()))
                s, z = find_params(cur, bits=bits, symmetric=symmetric)
                scales[:, col // gs], zeros[:, col // gs] = s, z
            g = col // gs if static is None else int(col_group[col])
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = quantize_with_params(w, s, z, bits=bits)
            q = torch.where(keep[:, col], q, z)
            Q[:, col] = q
            err = (w - dequantize_with_params(q, s, z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return _make_result(Q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric)
