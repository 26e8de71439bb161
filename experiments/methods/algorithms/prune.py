"""Weight pruning: magnitude, Wanda and SparseGPT, with unstructured, N:M and block patterns.

Pure torch, no model knowledge. ``W`` is an ``(N, K)`` float weight in ``nn.Linear`` layout; every
function returns ``(W_pruned, mask)`` with ``mask`` a bool ``(N, K)`` tensor, **True = kept**, and
``W_pruned`` exactly zero where the mask is False.

Patterns (:func:`parse_pattern`):

- ``"unstructured"``: a fraction ``sparsity`` of the weights is removed. Magnitude and Wanda compare
  weights within each output row (Wanda's "per output" group; ``scope="layer"`` gives the classic
  per-layer magnitude baseline) and remove exactly ``floor(sparsity * K)`` per row. SparseGPT selects
  adaptively in each block of ``block_size`` columns, across all rows of the block, removing exactly
  ``floor(sparsity * N * width)`` per block (Frantar & Alistarh 2023).
- ``"n:m"`` (``"2:4"``, ``"4:8"``): in every row, each group of ``m`` consecutive input columns keeps
  ``n`` weights; ``m`` must divide K. The sparsity is ``1 - n/m``; a ``sparsity`` argument, if given,
  must equal it.
- ``"block:BNxBK"`` (``"block:32x32"``): the weight is tiled into ``BN x BK`` blocks (which must
  divide N and K); a block's score is the sum of its weights' scores and exactly
  ``floor(sparsity * n_blocks)`` whole blocks are removed (SparseGPT: per column block).

Scores: magnitude ``|W_ij|``; Wanda ``|W_ij| * ||X_j||`` (Sun et al. 2023); SparseGPT
``W_ij^2 / [H^-1]_jj^2`` on the current, OBS-updated weights, whose surviving weights are then
corrected to compensate for the removed ones (float64 Cholesky of ``H^-1``).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from .hessian import check_hessian, check_weight, damped_hinv_chol, prepare_hessian

__all__ = ["Pattern", "parse_pattern", "magnitude", "wanda", "sparsegpt"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern. ``kind`` is ``"unstructured"``, ``"nm"`` or ``"block"``."""
    kind: str
    n: int = 0
    m: int = 0
    bn: int = 0
    bk: int = 0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.bn}x{self.bk}"
        return "unstructured"

    def module_kwargs(self) -> dict:
        """Keyword arguments for ``SparseLinear.from_linear`` describing this pattern."""
        if self.kind == "nm":
            return {"pattern": "nm", "n": self.n, "m": self.m}
        if self.kind == "block":
            return {"pattern": "block", "block": (self.bn, self.bk)}
        return {"pattern": "unstructured"}

    def check_fits(self, N: int, K: int) -> None:
        """Raise ValueError naming the pattern and what would fit if it cannot tile an (N, K) weight."""
        if self.kind == "nm" and K % self.m:
            raise ValueError(f"pattern={str(self)!r}: m={self.m} does not divide K={K} input features; "
                             f"m values that fit: {_divisors(K, upto=32)}")
        if self.kind == "block" and (N % self.bn or K % self.bk):
            raise ValueError(f"pattern={str(self)!r} does not tile a ({N}, {K}) weight; block rows that fit: "
                             f"{_divisors(N, upto=256)}, block columns that fit: {_divisors(K, upto=256)}")


def _divisors(x: int, upto: int) -> list[int]:
    return [d for d in range(2, min(x, upto) + 1) if x % d == 0]


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """``"unstructured"`` | ``"N:M"`` | ``"block:BNxBK"`` -> :class:`Pattern`."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str like 'unstructured', '2:4' or 'block:32x32', got {pattern!r}")
    s = pattern.strip().lower()
    if s == "unstructured":
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"pattern={pattern!r}: N:M needs 0 < N < M (N weights kept of every M), e.g. '2:4'")
        return Pattern("nm", n=n, m=mm)
    m = re.fullmatch(r"block:(\d+)x(\d+)", s)
    if m:
        bn, bk = int(m.group(1)), int(m.group(2))
        if bn < 1 or bk < 1:
            raise ValueError(f"pattern={pattern!r}: block sizes must be positive, e.g. 'block:32x32'")
        return Pattern("block", bn=bn, bk=bk)
    raise ValueError(f"pattern={pattern!r} is not one of 'unstructured', 'N:M' (e.g. '2:4', '4:8') "
                     "or 'block:BNxBK' (e.g. 'block:32x32')")


def _resolve(W: torch.Tensor, sparsity, pattern) -> tuple[Pattern, float]:
    check_weight(W)
    p = parse_pattern(pattern)
    p.check_fits(*W.shape)
    if p.kind == "nm":
        implied = 1 - p.n / p.m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-6:
            raise ValueError(f"sparsity={sparsity} contradicts pattern={str(p)!r}, which implies sparsity "
                             f"{implied:g}; pass sparsity=None or {implied:g}")
        return p, implied
    if sparsity is None or isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a float in [0, 1) for pattern={str(p)!r}, got {sparsity!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity}")
    return p, float(sparsity)


def _count(sparsity: float, n: int) -> int:
    # The epsilon absorbs float error in e.g. 0.7 * 10 = 6.999999999999999.
    return int(math.floor(sparsity * n + 1e-9))


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing exactly the ``k`` lowest entries of each row of ``score`` (stable ties)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.argsort(score, dim=-1, stable=True)[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def _select(score: torch.Tensor, p: Pattern, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask for a score (N, K) under pattern ``p``."""
    N, K = score.shape
    if p.kind == "unstructured":
        if scope == "layer":
            return _prune_lowest(score.reshape(1, -1), _count(sparsity, N * K)).reshape(N, K)
        return _prune_lowest(score, _count(sparsity, K))
    if p.kind == "nm":
        return _prune_lowest(score.reshape(N, K // p.m, p.m), p.m - p.n).reshape(N, K)
    nb_r, nb_c = N // p.bn, K // p.bk
    block_score = score.reshape(nb_r, p.bn, nb_c, p.bk).sum(dim=(1, 3))
    keep_b = _prune_lowest(block_score.reshape(1, -1), _count(sparsity, nb_r * nb_c)).reshape(nb_r, nb_c)
    return keep_b.repeat_interleave(p.bn, 0).repeat_interleave(p.bk, 1)


def _check_scope(scope: str) -> None:
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' (compare within each output row) or 'layer', got {scope!r}")


def magnitude(W: torch.Tensor, *, sparsity: float | None, pattern: "str | Pattern",
              scope: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the smallest ``|W_ij|``. ``scope`` ("row" | "layer") applies to unstructured only."""
    p, sparsity = _resolve(W, sparsity, pattern)
    _check_scope(scope)
    mask = _select(W.abs().float(), p, sparsity, scope)
    return torch.where(mask, W, torch.zeros((), dtype=W.dtype)), mask


def wanda(W: torch.Tensor, act_sq_norm: torch.Tensor, *, sparsity: float | None, pattern: "str | Pattern",
          scope: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: remove the smallest ``|W_ij| * sqrt(act_sq_norm_j)``.

    ``act_sq_norm`` (K,) is the per-input-feature sum of squared calibration activations (the
    diagonal of X^T X; any positive multiple, e.g. diag(H), selects the same weights).
    """
    p, sparsity = _resolve(W, sparsity, pattern)
    _check_scope(scope)
    K = W.shape[1]
    if not isinstance(act_sq_norm, torch.Tensor) or tuple(act_sq_norm.shape) != (K,):
        raise ValueError(f"act_sq_norm must be a ({K},) tensor of per-input squared activation sums, got "
                         f"{getattr(act_sq_norm, 'shape', type(act_sq_norm))}")
    if not torch.isfinite(act_sq_norm).all() or bool((act_sq_norm < 0).any()):
        raise ValueError("act_sq_norm must be finite and non-negative")
    score = W.abs().float() * act_sq_norm.float().sqrt()[None, :]
    mask = _select(score, p, sparsity, scope)
    return torch.where(mask, W, torch.zeros((), dtype=W.dtype)), mask


def sparsegpt(W: torch.Tensor, H: torch.Tensor, *, sparsity: float | None, pattern: "str | Pattern",
              damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with adaptive mask selection.

    Columns are processed left to right in blocks of ``block_size`` (rounded down to a multiple of
    ``m`` or ``BK`` so no group straddles two blocks). Unstructured and block masks are chosen at the
    start of each column block from ``W^2 / [H^-1]_jj^2`` of the updated weights; N:M masks at the
    start of each group of ``m`` columns. Every removed weight's error is spread over the remaining
    columns with the upper Cholesky factor of ``H^-1``. Returns the updated weight (float32, exactly
    zero where pruned) and the keep-mask.
    """
    p, sparsity = _resolve(W, sparsity, pattern)
    N, K = W.shape
    check_hessian(H, K)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    unit = p.m if p.kind == "nm" else p.bk if p.kind == "block" else 1
    bs = max(unit, block_size // unit * unit)
    W, H, _ = prepare_hessian(W, H, damp)
    Hinv = damped_hinv_chol(H, damp).to(torch.float32)
    d_all = Hinv.diagonal()
    keep = torch.ones(N, K, dtype=torch.bool)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty(N, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if p.kind != "nm":
            score = W1 ** 2 / d_all[i1:i2][None, :] ** 2
            if p.kind == "unstructured":
                keep1 = _prune_lowest(score.reshape(1, -1), _count(sparsity, score.numel())).reshape(score.shape)
            else:
                keep1 = _select(score, p, sparsity)
            keep[:, i1:i2] = keep1
        for i in range(i2 - i1):
            col = i1 + i
            if p.kind == "nm" and i % p.m == 0:
                score = W1[:, i:i + p.m] ** 2 / d_all[col:col + p.m][None, :] ** 2
                keep[:, col:col + p.m] = _prune_lowest(score, p.m - p.n)
            w = W1[:, i]
            q = torch.where(keep[:, col], w, torch.zeros(()))
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep
