"""HQQ: calibration-free quantization whose zero-points minimise an lp (p < 1) weight error.

Pure torch, no model knowledge, no data. ``W`` is an ``(N, K)`` float weight in ``nn.Linear`` layout;
the result is a :class:`~.quant.QuantResult` on the asymmetric grid of ``triton_kernels/dequant_matmul.py``
(``w = (q - z) * s``, codes in ``[0, 2^bits)``, groups of ``group_size`` columns along K, a partial last
group allowed), except that the zero-points ``z`` are **fractional** (``QuantLinear`` stores them as
floats; GGUF's Q4_1 stores ``-z * s``, so it holds them too; compressed-tensors' integer zero-points do not).

Follows Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"
(mobiusml.github.io/hqq_blog), and its authors' code, ``mobiusml/hqq`` 0.2.8.post1:
``Quantizer.quantize`` (hqq/core/quantize.py) with the defaults of ``BaseQuantizeConfig`` (groups along
the input axis, ``axis=1``) and the default solver ``optimize_weights_proximal`` =
``optimize_weights_proximal_legacy`` (hqq/core/optimize.py). Per group, with the *inverse* scale ``a``
as the reference works with it (``q = round(w a + z)``, ``w_r = (q - z) / a``):

1. start from min/max: ``a = (2^bits - 1) / (max - min)``, ``z = -min a`` (rounded at 4 bits only:
   ``round_zero`` is on for ``nbits == 4`` in ``BaseQuantizeConfig``); the scale is never changed again;
2. half-quadratic splitting of ``min_z ||w - w_r(z)||_p^p`` (``p = lp_norm`` = 0.7): alternate
   ``e = shrink_p(w - w_r)`` (the generalised soft-threshold
   ``sign(x) relu(|x| - |x|^(p-1) / beta)``) and the closed-form zero ``z = mean_group(q - (w - e) a)``,
   with ``beta *= kappa`` each step (10 and 1.01), at most ``iters`` (20) steps;
3. early stop on the layer's mean ``|w - w_r|`` (one scalar over every group, as the reference does):
   the first step that does not lower it ends the search.

What differs from the reference, and why:

- The result is the best *evaluated* zero. The legacy solver returns the zero it computed in the step
  that failed to improve (or after the last step), which it never evaluated; its ``_v2`` keeps the best
  zero as here. The tests compare both on real layers (ratio of weight errors ~1).
- Groups are per row, with a partial last group (``K = 576`` with groups of 128); the reference reshapes
  the flattened weight into groups, so a group straddles two rows when ``group_size`` does not divide
  K. Min, max, the mean of the zero update and the error ignore the padding.
- No clamp of the inverse scale at 2e4 and no ``range <= 1e-4 -> a = 1`` rule (both guard the
  reference's fp16 arithmetic, and are not scale-invariant; this runs in fp32 and ``QuantLinear`` stores
  ``s``, not ``a``). Instead the step is at least ``max|w| / 2^10`` of the group, so ``|z| <= 2^10`` and
  its fp16 copy is within half a step (a near-constant group, e.g. all weights equal, is the only kind it
  changes: it is then represented to ``2^-11`` of its magnitude); an all-zero group gets ``s = 1``.
- Only the zero-points are optimised (the reference's default; its experimental scale grid search,
  ``scale_gridsearch`` of ``_v2``, is not offered).
"""
from __future__ import annotations

import torch

from .hessian import check_weight
from .quant import QuantResult, check_quant_args

__all__ = ["DEFAULTS", "hqq", "shrink_lp", "codes_for"]

# A group's step is at least max|w| / MIN_SPACING_DIV (see hqq()).
MIN_SPACING_DIV = 2.0 ** 10
# mobiusml/hqq's defaults (optimize_weights_proximal_legacy's opt_params).
DEFAULTS = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The generalised soft-threshold of the lp half-quadratic step: ``sign(x) relu(|x| - |x|^(p-1) / beta)``
    (``p = 1``: plain soft-thresholding at ``1 / beta``). ``x = 0`` maps to 0."""
    a = x.abs()
    thr = 1.0 / beta if lp_norm == 1 else a.pow(lp_norm - 1) / beta
    return torch.sign(x) * (a - thr).clamp_min(0.0)


def _grouped(W: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, G, gs)`` zero-padded copy of ``W`` and the ``(1, G, gs)`` mask of real columns."""
    N, K = W.shape
    G = -(-K // gs)
    Wp = torch.zeros(N, G * gs, dtype=torch.float32)
    Wp[:, :K] = W
    valid = (torch.arange(G * gs) < K).reshape(1, G, gs)
    return Wp.reshape(N, G, gs), valid


def hqq(W: torch.Tensor, *, bits: int, group_size: int, lp_norm: float = DEFAULTS["lp_norm"],
        beta: float = DEFAULTS["beta"], kappa: float = DEFAULTS["kappa"], iters: int = DEFAULTS["iters"],
        round_zero: bool | None = None) -> QuantResult:
    """HQQ quantization of ``W`` (N, K); see the module docstring. ``round_zero``: round the initial
    zero-points (default: at 4 bits only, as ``BaseQuantizeConfig``). Returns fractional float32 zeros."""
    check_weight(W)
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm must be in (0, 1] (the p of the lp error), got {lp_norm!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the half-quadratic penalty), got {beta!r}")
    if not kappa > 1:
        raise ValueError(f"kappa must be > 1 (beta's growth per step), got {kappa!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if round_zero is None:
        round_zero = bits == 4
    maxq = 2 ** bits - 1
    W3, valid = _grouped(W.float(), gs)
    n_valid = valid.sum(-1, keepdim=True).float()  # (1, G, 1)
    lo = torch.where(valid, W3, torch.tensor(float("inf"))).amin(-1, keepdim=True)
    hi = torch.where(valid, W3, torch.tensor(float("-inf"))).amax(-1, keepdim=True)
    # The spacing is at least max|w| / 2^10 of the group, so |z| <= 2^10 and fp16 holds z to half a
    # step (only near-constant groups are affected); an all-zero group gets s = 1 (z = 0).
    rng = torch.maximum(hi - lo, torch.maximum(hi.abs(), lo.abs()) * (maxq / MIN_SPACING_DIV))
    inv = torch.where(rng > 0, maxq / rng.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    zero = -lo * inv
    if round_zero:
        zero = torch.round(zero)
    n_total = float(N * K)

    def evaluate(z):
        q = torch.clamp(torch.round(W3 * inv + z), 0, maxq)
        w_r = (q - z) / inv
        err = float(torch.where(valid, (W3 - w_r).abs(), 0.0).sum()) / n_total
        return q, w_r, err

    best_err, best_zero = float("inf"), zero
    for _ in range(iters):
        q, w_r, err = evaluate(zero)
        if not err < best_err:
            break
        best_err, best_zero = err, zero
        e = shrink_lp(W3 - w_r, beta, lp_norm)
        zero = torch.where(valid, q - (W3 - e) * inv, 0.0).sum(-1, keepdim=True) / n_valid
        beta *= kappa
    else:
        # The zero of the last step was not evaluated in the loop.
        if evaluate(zero)[2] < best_err:
            best_zero = zero
    scales = (1.0 / inv).expand(N, -1, -1).reshape(N, -1)
    zeros = best_zero.reshape(N, -1)
    q = torch.clamp(torch.round(W3 * inv + best_zero), 0, maxq).reshape(N, -1)[:, :K]
    return QuantResult(q=q.to(torch.uint8), scales=scales.contiguous(), zeros=zeros.contiguous(), bits=bits,
                       group_size=group_size, symmetric=False)


def codes_for(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
              group_size: int) -> QuantResult:
    """Nearest codes of ``W`` (N, K) on a given asymmetric grid (``scales``/``zeros`` (N, G), zeros may
    be fractional): what a grid rounded for storage (fp16 scales and zeros) is re-coded with."""
    check_weight(W)
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    s = scales.float().repeat_interleave(gs, dim=1)[:, :K]
    z = zeros.float().repeat_interleave(gs, dim=1)[:, :K]
    q = torch.clamp(torch.round(W.float() / s + z), 0, 2 ** bits - 1)
    return QuantResult(q=q.to(torch.uint8), scales=scales.float().contiguous(), zeros=zeros.float().contiguous(),
                       bits=bits, group_size=group_size, symmetric=False)
