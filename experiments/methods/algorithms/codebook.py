"""Non-uniform (codebook) weight quantization: NormalFloat, FP4 (E2M1), piecewise-linear, k-means,
SqueezeLLM, and GPTQ over any codebook.

Pure torch, no model knowledge. ``W`` is an ``(N, K)`` float weight in ``nn.Linear`` layout and every
method returns a :class:`CodebookResult` in the format of ``triton_kernels/codebook_matmul.py``::

    W_hat[n, k] = codebook[r, q[n, k]] * scales[n, k // group]      (r = n, or 0 for a shared table)

- ``q``: uint8 ``(N, K)`` codes in ``[0, 2^bits)``;
- ``codebook``: float32 ``(1, 2^bits)`` (one table shared by all rows: NF, FP4) or ``(N, 2^bits)``
  (one table per output row: piecewise, k-means, SqueezeLLM), sorted ascending;
- ``scales``: float32 ``(N, G)`` group scales, ``G = ceil(K / group)`` with the last group possibly
  partial, or ``None`` (all ones). ``group_size = -1`` means one group per row (per-channel).

Methods (their defining properties are what ``tests/test_alg_codebook.py`` checks):

- :func:`nf`: NormalFloat tables (QLoRA, Dettmers et al. 2023) scaled by each group's absmax. NF4 is
  the bitsandbytes table; NF2/NF3/NF5.. are built the same way (:func:`nf_table`).
- :func:`fp4`: the FP4 E2M1 element values ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` and their negatives (the MX /
  NVFP4 element grid) scaled by ``absmax / 6`` per group (16 or 32 in those formats). Scales are kept as
  16-bit floats here, not the formats' E8M0 / E4M3 scale encodings.
- :func:`piecewise`: a piecewise-linear grid (several segments, each with its own step): the table is
  ``c_i = c_0 + sum of the steps below level i``, with the ``2^bits - 1`` steps split into
  ``segments`` runs that share one step each. Starting from the uniform grid over each row's range, the
  offset and the per-segment steps (hence the breakpoints) are refitted by alternating nearest-level
  assignment and weighted least squares; a step is kept only if the grid stays strictly increasing and
  the error does not grow, so the result is monotone and never worse than the uniform start. With
  ``zero_level`` (the default) one level is exactly 0 throughout.
- :func:`kmeans`: per-row weighted 1-D k-means (Lloyd) from several starts (weighted-quantile centres,
  starts blended toward the uniform grid, and seeded greedy k-means++ starts); each row keeps its best
  fixed point (every free table entry the weighted mean of the weights rounded to it). With
  ``zero_level`` (the default) one entry is held at exactly 0.
- :func:`squeezellm`: :func:`kmeans` weighted by a sensitivity, SqueezeLLM's (Kim et al. 2023)
  per-weight Fisher (squared gradients of the dense model's loss, ``(N, K)``) or the cheaper per-input
  ``diag(X^T X)`` (``(K,)``), times ``(w != 0)`` as the reference code does. SqueezeLLM's
  dense-and-sparse outlier split is not part of this method.
- :func:`gptq_codebook`: GPTQ's column-by-column error feedback (``quant.gptq``: lazy blocks, upper
  Cholesky factor of the damped ``H^-1``, optional ``act_order``) rounding each column to the nearest
  entry of its row's table times its group scale. The table and scales are fixed beforehand (by any
  method above), so ``gptq`` combines with ``nf``, ``fp4``, ``kmeans``, ``squeezellm`` and ``piecewise``.

Grouped tables: a per-row table with group scales (k-means, SqueezeLLM, piecewise with
``group_size > 0``) is fitted to ``W / s`` where ``s`` is each group's absmax, with weights multiplied by
``s^2``, so the fitted objective is still the (weighted) squared error of ``W`` itself.

Rounding to a table: nearest entry; a value exactly halfway between two entries goes to the lower one.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .hessian import check_hessian, check_weight, damped_hinv_chol, prepare_hessian
from .quant import check_quant_args

__all__ = [
    "CodebookResult",
    "NF4_PUBLISHED",
    "FP4_E2M1",
    "nf_table",
    "fp4_table",
    "nearest_codes",
    "dequantize_codebook_result",
    "round_to_codebook",
    "group_absmax",
    "nf",
    "fp4",
    "piecewise",
    "kmeans",
    "squeezellm",
    "gptq_codebook",
    "weighted_error",
]

#: The 16 NF4 values published with QLoRA (bitsandbytes' table), ascending.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

#: Magnitudes of the FP4 E2M1 format (1 sign, 2 exponent, 1 mantissa bit; no inf/NaN).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass
class CodebookResult:
    """Codes, table(s) and group scales of an ``(N, K)`` weight quantized onto a codebook."""
    q: torch.Tensor                   # uint8 (N, K) in [0, 2^bits)
    codebook: torch.Tensor            # float32 (1 or N, 2^bits), ascending per row
    scales: torch.Tensor | None       # float32 (N, G) or None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

def nf_table(bits: int) -> torch.Tensor:
    """The ``2^bits`` NormalFloat values in [-1, 1], ascending, float32.

    QLoRA's asymmetric construction: ``2^(bits-1)`` positive values are standard-normal quantiles at
    ``linspace(offset, 1/2, 2^(bits-1) + 1)`` (last point dropped), ``2^(bits-1) - 1`` negative values the
    mirrored quantiles at ``linspace(offset, 1/2, 2^(bits-1))`` (last dropped), plus an exact 0; the
    set is divided by its maximum. ``offset = 1 - (1/(2(2^b - 1)) + 1/(2 * 2^b)) / 2`` is the paper's
    0.9677083 for ``b = 4`` (the midpoint of the outermost quantile positions of a ``2^b - 1`` and a
    ``2^b`` point grid); the same formula gives NF2, NF3, ... For ``bits = 4`` this reproduces
    :data:`NF4_PUBLISHED` (the tests check it to float16).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] for a NormalFloat table, got {bits!r}")
    half = 2 ** (bits - 1)
    offset = 1 - 0.5 * (1 / (2 * (2 ** bits - 1)) + 1 / (2 * 2 ** bits))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.max()).float()


def fp4_table() -> torch.Tensor:
    """The 16 FP4 E2M1 values, ascending, float32. ``-0`` and ``+0`` are both kept (as the format has
    both codes), so the table has one duplicate zero; the codes are the table's sorted order, not the
    E2M1 sign-magnitude bit patterns."""
    m = torch.tensor(FP4_E2M1)
    return torch.cat([-m.flip(0), m])


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------

def _check_bits(bits, lo: int = 1) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= 8:
        raise ValueError(f"bits must be an int in [{lo}, 8], got {bits!r}")


def _expand(p: torch.Tensor, gs: int, K: int) -> torch.Tensor:
    return p.repeat_interleave(gs, dim=1)[:, :K]


def group_absmax(W: torch.Tensor, gs: int) -> torch.Tensor:
    """``max |w|`` of every group of ``gs`` columns -> float32 ``(N, G)``; an all-zero group gets 1 (any
    positive scale represents it exactly when the table holds 0, and none divides by zero)."""
    N, K = W.shape
    G = -(-K // gs)
    Wp = torch.zeros(N, G * gs, dtype=torch.float32)
    Wp[:, :K] = W.abs()
    s = Wp.reshape(N, G, gs).amax(dim=2)
    return torch.where(s > 0, s, torch.ones_like(s))


def _check_table(codebook: torch.Tensor, N: int, name: str = "codebook") -> torch.Tensor:
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[0] not in (1, N):
        raise ValueError(f"{name} must be a (1, L) or ({N}, L) tensor, got {getattr(codebook, 'shape', type(codebook))}")
    L = codebook.shape[1]
    if L < 2 or L > 256 or L & (L - 1):
        raise ValueError(f"{name} must have 2^bits entries per row (2, 4, ..., 256), got {L}")
    if not codebook.is_floating_point() or not torch.isfinite(codebook).all():
        raise ValueError(f"{name} must hold finite floats, got {codebook.dtype}")
    return codebook


def _check_scales(scales, N: int, G: int) -> None:
    if scales is None:
        return
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (N, G):
        raise ValueError(f"scales must be None or a ({N}, {G}) tensor (rows x ceil(K / group_size)), got "
                         f"{getattr(scales, 'shape', type(scales))}")
    if not torch.isfinite(scales).all() or bool((scales <= 0).any()):
        raise ValueError("scales must be finite and positive")


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's table for ``x`` (N, ...) -> int64 of ``x``'s shape.

    ``codebook`` is ``(1, L)`` or ``(N, L)``, in any order (it is sorted here and the index mapped
    back). Ties go to the smaller entry.
    """
    N = x.shape[0]
    vals, order = codebook.to(x.dtype).sort(dim=1)
    vals, order = vals.expand(N, -1), order.expand(N, -1)
    mid = (vals[:, 1:] + vals[:, :-1]) / 2
    flat = x.reshape(N, -1).contiguous()
    idx = torch.searchsorted(mid.contiguous(), flat)  # number of midpoints strictly below x
    return order.gather(1, idx).reshape(x.shape)


def _lookup(codebook: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return codebook.float().expand(q.shape[0], -1).gather(1, q.long())


def dequantize_codebook_result(r: CodebookResult) -> torch.Tensor:
    """Float32 ``(N, K)`` weight represented by ``r``."""
    N, K = r.q.shape
    W = _lookup(r.codebook, r.q)
    if r.scales is not None:
        W = W * _expand(r.scales.float(), K if r.group_size == -1 else r.group_size, K)
    return W


def round_to_codebook(W: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None, *,
                      group_size: int = -1) -> CodebookResult:
    """Nearest rounding of ``W`` (N, K) onto a given table (1 or N, 2^bits) times group ``scales``
    (N, G) or None: the codes every method above returns, for a table that was changed afterwards
    (e.g. rounded to the float16 a deployment stores)."""
    check_weight(W)
    N, K = W.shape
    _check_table(codebook, N)
    bits = int(math.log2(codebook.shape[1]))
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    _check_scales(scales, N, -(-K // gs))
    x = W.float() if scales is None else W.float() / _expand(scales.float(), gs, K)
    return _result(nearest_codes(x, codebook.float()), codebook.float().clone(), scales, bits, group_size)


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` in float64 (``H = I`` when None): the layer-output error
    GPTQ minimises when ``H = X^T X / n``."""
    D = (W.double() - W_hat.double())
    if H is None:
        return float((D * D).sum())
    return float(((D @ H.double()) * D).sum())


def _result(q, codebook, scales, bits, group_size) -> CodebookResult:
    return CodebookResult(q=q.to(torch.uint8), codebook=codebook.float().contiguous(),
                          scales=None if scales is None else scales.float().contiguous(),
                          bits=bits, group_size=group_size)


def _weights(weights, N: int, K: int) -> torch.Tensor | None:
    """Per-weight importance as float64 (N, K): ``None``, a (K,) column vector, or (N, K)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) not in ((K,), (N, K)):
        raise ValueError(f"weights must be None, a ({K},) per-input or ({N}, {K}) per-weight tensor, got "
                         f"{getattr(weights, 'shape', type(weights))}")
    if not torch.isfinite(weights).all() or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    return weights.to(torch.float64).expand(N, K)


def _normalised(W: torch.Tensor, group_size: int, weights):
    """``(X, weights, scales)`` for fitting a per-row table: ``X = W / s`` with group absmax scales and
    weights times ``s^2`` when grouped, else ``W`` itself and ``scales = None``."""
    N, K = W.shape
    w = _weights(weights, N, K)
    if w is None:
        w = torch.ones(N, K, dtype=torch.float64)
    if group_size == -1:
        return W.double(), w, None
    s = group_absmax(W, group_size)
    se = _expand(s, group_size, K).double()
    return W.double() / se, w * se ** 2, s


# ---------------------------------------------------------------------------------------------------
# Fixed tables: NormalFloat and FP4
# ---------------------------------------------------------------------------------------------------

def _scaled_table(W: torch.Tensor, table: torch.Tensor, *, bits: int, group_size: int, divisor: float) -> CodebookResult:
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    s = group_absmax(W.float(), gs) / divisor
    q = nearest_codes(W.float() / _expand(s, gs, K), table[None, :])
    return _result(q, table[None, :], s, bits, group_size)


def nf(W: torch.Tensor, *, bits: int = 4, group_size: int = 64) -> CodebookResult:
    """NormalFloat quantization: the shared :func:`nf_table` times each group's absmax."""
    check_weight(W)
    table = nf_table(bits)
    return _scaled_table(W, table, bits=bits, group_size=group_size, divisor=1.0)


def fp4(W: torch.Tensor, *, group_size: int = 32) -> CodebookResult:
    """FP4 E2M1 quantization: the shared :func:`fp4_table` times ``absmax / 6`` per group."""
    check_weight(W)
    return _scaled_table(W, fp4_table(), bits=4, group_size=group_size, divisor=6.0)


# ---------------------------------------------------------------------------------------------------
# Weighted 1-D k-means (exact Lloyd on sorted rows) and SqueezeLLM
# ---------------------------------------------------------------------------------------------------

#: Deterministic starting points of :func:`kmeans`: fraction of the way from the weighted-quantile
#: centres (0) to the uniform grid over the row's range (1).
KMEANS_STARTS = (0.0, 0.25, 0.5, 0.75, 1.0)

#: Seeded greedy k-means++ starts :func:`kmeans` adds to :data:`KMEANS_STARTS` by default.
KMEANS_RESTARTS = 4


class _SortedRows:
    """Rows of ``X`` (N, K) float64 sorted once, with prefix sums of the weights ``w``, ``w x`` and
    ``w x^2``, so that for any ascending per-row table the nearest-level clusters (contiguous runs of
    the sorted row), their weight, weighted sum and squared error cost ``O(L log K)`` per row instead of
    ``O(K log L)``. Tables are ``(N, L)`` or ``(N, S, L)`` (``S`` tables per row, e.g. several k-means
    starts, sharing one sort and one set of prefix sums)."""

    def __init__(self, X: torch.Tensor, w: torch.Tensor):
        N, K = X.shape
        self.xs, order = X.sort(dim=1)
        ws = w.gather(1, order)
        # A row whose weights are all zero (all of its inputs dead) is fitted unweighted.
        ws = torch.where(ws.sum(dim=1, keepdim=True) > 0, ws, torch.ones_like(ws))
        self.ws = ws
        zero = torch.zeros(N, 1, dtype=torch.float64)
        self.cw = torch.cat([zero, ws.cumsum(dim=1)], dim=1)              # (N, K+1)
        self.cwx = torch.cat([zero, (ws * self.xs).cumsum(dim=1)], dim=1)
        self.cwxx = torch.cat([zero, (ws * self.xs ** 2).cumsum(dim=1)], dim=1)

    def quantiles(self, L: int) -> torch.Tensor:
        """Weighted quantiles ``(i + 1/2) / L`` of every row -> (N, L)."""
        K = self.xs.shape[1]
        target = (torch.arange(L, dtype=torch.float64) + 0.5) / L * self.cw[:, -1:]
        pick = torch.searchsorted(self.cw[:, 1:].contiguous(), target.contiguous()).clamp(max=K - 1)
        return self.xs.gather(1, pick)

    def bounds(self, table: torch.Tensor) -> torch.Tensor:
        """Cluster ``i`` of an ascending ``table`` (N, [S,] L) = sorted positions ``[b_i, b_{i+1})``, as
        (N, [S,] L + 1); values exactly at a midpoint go to the lower level, as in :func:`nearest_codes`."""
        N, K, L = self.xs.shape[0], self.xs.shape[1], table.shape[-1]
        mid = (table[..., 1:] + table[..., :-1]) / 2
        ends = torch.searchsorted(self.xs, mid.reshape(N, -1).contiguous(), right=True).reshape(mid.shape)
        first = torch.zeros(*mid.shape[:-1], 1, dtype=torch.long)
        return torch.cat([first, ends, torch.full_like(first, K)], dim=-1)

    def sums(self, b: torch.Tensor):
        """Weight, weighted sum and weighted sum of squares of every cluster -> three (N, [S,] L)."""
        N = b.shape[0]
        flat = b.reshape(N, -1)
        out = []
        for c in (self.cw, self.cwx, self.cwxx):
            v = c.gather(1, flat).reshape(b.shape)
            out.append(v[..., 1:] - v[..., :-1])
        return tuple(out)

    def error(self, table: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of rounding every row to its nearest entry of ``table`` -> (N, [S])."""
        n, sx, sxx = self.sums(self.bounds(table))
        return (sxx - 2 * table * sx + table ** 2 * n).sum(dim=-1).clamp(min=0)


def _lloyd(rows: _SortedRows, centres: torch.Tensor, iters: int, *, zero_level: bool = False) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd) of every row from ascending ``centres`` (N, [S,] L) -> centres of
    the same shape, float64, ascending.

    A cluster is a contiguous run of the sorted row and its weighted mean comes from prefix sums; an
    empty (zero-weight) cluster keeps its centre. With ``zero_level`` an entry equal to 0 is held at 0
    (the start must hold one) and the others move to their means: each step still cannot increase
    the error, so this is Lloyd's iteration for the table constrained to contain 0. Stops when no
    assignment changes (every free entry is then exactly the mean of its cluster) or after ``iters``
    updates.
    """
    prev = None
    for _ in range(iters):
        b = rows.bounds(centres)
        if prev is not None and torch.equal(b, prev):
            break
        n, sx, _ = rows.sums(b)
        new = torch.where(n > 0, sx / torch.where(n > 0, n, torch.ones_like(n)), centres)
        if zero_level:
            new = torch.where(centres == 0, torch.zeros_like(new), new)
        centres = new.sort(dim=-1).values
        prev = b
    return centres


def _with_zero(centres: torch.Tensor) -> torch.Tensor:
    """``centres`` (..., L) with the entry nearest 0 replaced by an exact 0, ascending."""
    i = centres.abs().argmin(dim=-1, keepdim=True)
    return centres.scatter(-1, i, torch.zeros_like(i, dtype=centres.dtype)).sort(dim=-1).values


def _kmeans_pp(rows: _SortedRows, L: int, restarts: int, generator: torch.Generator, *,
               zero_level: bool) -> torch.Tensor:
    """``restarts`` greedy k-means++ starts per row (Arthur & Vassilvitskii 2007, with the
    ``2 + floor(ln L)`` local trials per centre of scikit-learn's ``KMeans(init="k-means++")``), the
    sampling weighted by the per-weight importance as sklearn's ``sample_weight`` does -> ascending
    centres (N, restarts, L). With ``zero_level`` the first centre is 0 instead of a sampled weight, so
    the later ones are drawn against the fixed zero level.

    Each new centre is drawn with probability ``w * d^2`` (``d``: distance to the nearest centre so
    far); of the trials, the one whose table has the smallest weighted error is kept. In 1-D that error
    comes from the sorted row's prefix sums (:meth:`_SortedRows.error`), so a trial costs
    ``O(L log K)``, not ``O(K)``.
    """
    N, K = rows.xs.shape
    R = restarts
    trials = 2 + int(math.log(L))
    w = rows.ws[:, None, :].expand(N, R, K)
    if zero_level:
        centres = torch.zeros(N, R, 1, dtype=torch.float64)
    else:
        pick = torch.multinomial(w.reshape(N * R, K), 1, generator=generator).reshape(N, R, 1)
        centres = rows.xs.gather(1, pick.reshape(N, R)).reshape(N, R, 1)
    for c in range(1, L):
        # squared distance of every weight to its nearest centre so far (centres ascending)
        mid = ((centres[..., 1:] + centres[..., :-1]) / 2).reshape(N * R, c - 1)
        xs = rows.xs[:, None, :].expand(N, R, K).reshape(N * R, K)
        near = centres.reshape(N * R, c).gather(1, torch.searchsorted(mid.contiguous(), xs.contiguous()))
        p = (w.reshape(N * R, K) * (xs - near) ** 2)
        # A row already represented exactly (fewer distinct values than centres) samples by weight.
        p = torch.where(p.sum(dim=1, keepdim=True) > 0, p, w.reshape(N * R, K))
        cand = torch.multinomial(p, trials, replacement=True, generator=generator)          # (N*R, T)
        cx = xs.gather(1, cand).reshape(N, R, trials, 1)
        tables = torch.cat([centres[:, :, None, :].expand(N, R, trials, c), cx], dim=-1).sort(dim=-1).values
        err = rows.error(tables.reshape(N, R * trials, c + 1)).reshape(N, R, trials)
        best = err.argmin(dim=-1)                                                           # first best on ties
        centres = tables.gather(2, best[:, :, None, None].expand(N, R, 1, c + 1))[:, :, 0]
    return centres


def kmeans(W: torch.Tensor, *, bits: int, group_size: int = -1, weights: torch.Tensor | None = None,
           iters: int = 100, zero_level: bool = True, restarts: int = KMEANS_RESTARTS,
           seed: int = 0) -> CodebookResult:
    """Per-row weighted 1-D k-means table of ``2^bits`` entries (Lloyd's iteration, :func:`_lloyd`).

    Lloyd's iteration only finds a local minimum, and on rows of a few hundred weights the one reached
    from one start is often poor (at 4 bits on Gaussian rows of 256 the quantile start's squared error
    was 1.6x that of a start halfway to the uniform grid). So Lloyd runs from several starts and each
    row keeps the fixed point with the smallest weighted error: the deterministic starts of
    :data:`KMEANS_STARTS` (the fraction of the way from the weighted quantiles to the uniform grid)
    and ``restarts`` greedy k-means++ starts drawn from a generator seeded with ``seed``
    (:func:`_kmeans_pp`; sklearn's ``KMeans``, which SqueezeLLM's reference code runs, makes one such
    start and runs at most 50 Lloyd steps). Each start runs to a fixed point or ``iters`` steps.

    ``zero_level`` (default): the table holds an exact 0, fixed during the iteration (the start's
    entry nearest 0 is set to 0; k-means++ starts draw their first centre at 0). A weight rounded to
    it is exactly 0, as on the uniform asymmetric grid and the NF/FP4 tables. The reason: the
    default model has input channels whose activations are thousands of times the median (attention
    sinks, massive activations) and whose weights are tiny; a table without 0 turns each such weight
    into the smallest level times the scale (at 3 bits about twice its size) and the sink tokens
    multiply that error by their huge activations. Without 0 (``zero_level=False``) 3-bit g128 k-means
    gave perplexity 1,351 vs RTN's 92.7 on the default model (issue 23).

    ``weights``: None (plain k-means), a ``(K,)`` per-input or an ``(N, K)`` per-weight importance.
    ``group_size > 0`` adds group absmax scales (the table is fitted to ``W / s``, weights times ``s^2``).
    """
    check_weight(W)
    _check_bits(bits)
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative int (k-means++ starts), got {restarts!r}")
    if not isinstance(zero_level, bool):
        raise ValueError(f"zero_level must be True (the table holds an exact 0) or False, got {zero_level!r}")
    X, w, s = _normalised(W.float(), -1 if group_size == -1 else gs, weights)
    L = 2 ** bits
    # All starts share one sort and one set of prefix sums: centres (N, S, L).
    rows = _SortedRows(X, w)
    quant = rows.quantiles(L)[:, None, :]
    lin = rows.xs[:, :1, None] + (rows.xs[:, -1:, None] - rows.xs[:, :1, None]) * torch.linspace(
        0, 1, L, dtype=torch.float64)
    mix = torch.tensor(KMEANS_STARTS, dtype=torch.float64)[None, :, None]
    starts = (1 - mix) * quant + mix * lin
    if zero_level:
        starts = _with_zero(starts)
    if restarts:
        g = torch.Generator().manual_seed(int(seed))
        starts = torch.cat([starts, _kmeans_pp(rows, L, restarts, g, zero_level=zero_level)], dim=1)
    centres = _lloyd(rows, starts, iters, zero_level=zero_level)
    best = rows.error(centres).argmin(dim=1)           # (N,): the first start wins ties
    table = centres[torch.arange(N), best].float()
    q = nearest_codes(X.float(), table)
    return _result(q, table, s, bits, group_size)


def squeezellm(W: torch.Tensor, sensitivity: torch.Tensor, *, bits: int, group_size: int = -1,
               iters: int = 100, zero_level: bool = False, restarts: int = KMEANS_RESTARTS,
               seed: int = 0) -> CodebookResult:
    """SqueezeLLM's (Kim et al. 2023) sensitivity-weighted k-means: :func:`kmeans` with weight ``w_nk``
    counting ``sensitivity`` times ``(w_nk != 0)``.

    ``sensitivity``: an ``(N, K)`` per-weight importance, SqueezeLLM's Fisher information (the sum
    over calibration windows of the squared gradient of the dense model's loss with respect to each
    weight, :func:`experiments.lm.models.squared_gradients`), or a ``(K,)`` per-input importance such
    as ``diag(X^T X)``, the output-error weighting of ``||(W - W_hat) X^T||^2`` restricted to its
    diagonal (cheaper: no backward pass; it is *not* the Fisher, which also carries each output's
    gradient). Any positive multiple gives the same table.

    Follows the reference ``quantization/nuq.py`` (SqueezeAILab/SqueezeLLM): one table per output row,
    sample weights ``grad^2 * (w != 0)`` (a row whose weights all get 0 is fitted unweighted, as there),
    weighted k-means with k-means++ starts. Differs: the clusterer is :func:`kmeans` (more starts,
    Lloyd to a fixed point or ``iters`` steps, instead of sklearn's one k-means++ start, ``max_iter=50``
    and its tolerance); ``zero_level`` is offered but off by default (the paper has none);
    SqueezeLLM's dense-and-sparse outlier split is not part of this method.
    """
    check_weight(W)
    N, K = W.shape
    if not isinstance(sensitivity, torch.Tensor) or tuple(sensitivity.shape) not in ((K,), (N, K)):
        raise ValueError(f"sensitivity must be a ({K},) per-input (diag of X^T X) or ({N}, {K}) per-weight "
                         f"(Fisher) tensor, got {getattr(sensitivity, 'shape', type(sensitivity))}")
    if not torch.isfinite(sensitivity).all() or bool((sensitivity < 0).any()) or not bool((sensitivity > 0).any()):
        raise ValueError("sensitivity must be finite, non-negative and not all zero "
                         "(the layer received no calibration input or gradient)")
    weights = sensitivity.to(torch.float64).expand(N, K) * (W != 0)
    return kmeans(W, bits=bits, group_size=group_size, weights=weights, iters=iters, zero_level=zero_level,
                  restarts=restarts, seed=seed)


# ---------------------------------------------------------------------------------------------------
# Piecewise-linear grid
# ---------------------------------------------------------------------------------------------------

def _segment_design(L: int, segments: int) -> torch.Tensor:
    """``A`` (L, 1 + S) with ``table = A @ [c_0, d_1..d_S]``: ``A[i, 1 + j]`` counts the steps of segment
    ``j`` below level ``i``; the ``L - 1`` steps are split into ``S`` runs as evenly as possible."""
    S = min(segments, L - 1)
    sizes = [(L - 1) // S + (1 if j < (L - 1) % S else 0) for j in range(S)]
    seg_of_step = torch.repeat_interleave(torch.arange(S), torch.tensor(sizes))   # (L-1,)
    onehot = torch.nn.functional.one_hot(seg_of_step, S).double()                  # (L-1, S)
    A = torch.zeros(L, 1 + S, dtype=torch.float64)
    A[:, 0] = 1
    A[1:, 1:] = onehot.cumsum(dim=0)
    return A


def _zero_grid_start(lo: torch.Tensor, hi: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (N,) and zero index (N,) of the uniform asymmetric grid ``(i - z) * step`` of every row:
    RTN's (``quant.rtn``, ``symmetric=False``): the range widened to hold 0, ``step = (hi - lo) / (L - 1)``,
    ``z = round(-lo / step)``; level ``z`` is exactly 0. In float32 as RTN computes it, so the same ``z``
    on a tie (a row of ``W / s`` spans exactly [-1, 1]: ``-lo / step`` is 3.5 at 3 bits)."""
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    step = (hi - lo) / (L - 1)
    z = torch.round(-lo / torch.where(step > 0, step, torch.ones_like(step))).clamp(0, L - 1).long()
    return step.double(), z


def piecewise(W: torch.Tensor, *, bits: int, group_size: int = -1, segments: int = 4,
              weights: torch.Tensor | None = None, iters: int = 30, zero_level: bool = True) -> CodebookResult:
    """Piecewise-linear grid per row: ``segments`` runs of levels, each with its own step.

    Start: the uniform grid ``linspace(min, max, 2^bits)`` of each row of ``W`` (of ``W / s`` with group
    absmax scales when ``group_size > 0``); with ``zero_level`` (default) RTN's asymmetric grid
    ``(i - z) * step`` of the row, whose level ``z`` is exactly 0 (:func:`_zero_grid_start`), so that
    per-channel the fit is never worse than RTN-asym in (weighted) squared error. Then, ``iters`` times: assign every weight to its nearest level; refit the offset and the
    per-segment steps by weighted least squares on those assignments (with ``zero_level`` the offset
    is not free: level ``z`` stays exactly 0 and only the steps are refitted); keep a row's refit only
    if all its steps stay positive and its (weighted) squared error does not grow. Each accepted step
    can only lower the error, so the final grid is monotone and never worse than the start.

    Why the zero level is the default: see :func:`kmeans` (massive-activation inputs with tiny weights;
    without 0 the 3-bit g128 grid gave perplexity 11,812 vs RTN's 92.7 on the default model, issue 23).
    This grid is this project's own (no paper's reference code).
    """
    check_weight(W)
    _check_bits(bits)
    N, K = W.shape
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive int, got {segments!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if not isinstance(zero_level, bool):
        raise ValueError(f"zero_level must be True (the table holds an exact 0) or False, got {zero_level!r}")
    L = 2 ** bits
    X, w, s = _normalised(W.float(), -1 if group_size == -1 else gs, weights)
    A = _segment_design(L, segments)
    S = A.shape[1] - 1
    lo, hi = X.amin(dim=1), X.amax(dim=1)
    if zero_level:
        # table = B theta with theta = the S steps and B = A's step columns minus their row z (level z = 0).
        step, z = _zero_grid_start(lo, hi, L)
        B = A[None, :, 1:] - A[z, 1:][:, None, :]                              # (N, L, S)
        first = 0
    else:
        step = (hi - lo) / (L - 1)
        B = A.expand(N, L, 1 + S)
        first = 1
    step = torch.where(step > 0, step, torch.ones_like(step))      # constant row: exact at level 0 / z
    theta = step[:, None].expand(N, S)
    if not zero_level:
        theta = torch.cat([lo[:, None], theta], dim=1)                             # (N, 1 + S)
    table = torch.einsum("nlp,np->nl", B, theta)
    start = table
    rows = _SortedRows(X, w)
    err = rows.error(table)
    for _ in range(iters):
        n, sx, _ = rows.sums(rows.bounds(table))
        # min over theta of sum_i n_i (B_i theta - mean_i)^2: normal equations (B^T diag(n) B) theta = B^T sx,
        # with a vanishing ridge toward the current theta, so a step no weight constrains (e.g. to an
        # empty end level of the zero-level start) keeps its value instead of collapsing to 0.
        M = torch.einsum("nli,nl,nlj->nij", B, n, B)
        eps = 1e-9 * M.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-300)[:, None]
        rhs = torch.einsum("nli,nl->ni", B, sx) + eps * theta
        M = M + torch.diag_embed(eps.expand_as(theta))
        new_theta = (torch.linalg.pinv(M) @ rhs[:, :, None])[:, :, 0]
        new_table = torch.einsum("nlp,np->nl", B, new_theta)
        new_err = rows.error(new_table)
        ok = torch.isfinite(new_theta).all(dim=1) & (new_theta[:, first:] > 0).all(dim=1) & (new_err < err)
        if not bool(ok.any()):
            break
        theta = torch.where(ok[:, None], new_theta, theta)
        table = torch.where(ok[:, None], new_table, table)
        err = torch.where(ok, new_err, err)
    # The acceptance test above uses prefix sums (exact up to rounding); the final guard compares the
    # float32 tables the result holds, directly, so "never worse than the start" is exact.
    start32, table32 = start.float(), table.float()
    X32, w32 = X.float(), w.float()
    worse = _direct_error(X32, w32, table32) > _direct_error(X32, w32, start32)
    table32 = torch.where(worse[:, None], start32, table32)
    q = nearest_codes(X32, table32)
    return _result(q, table32, s, bits, group_size)


def _direct_error(X: torch.Tensor, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    q = nearest_codes(X, table)
    return (w.double() * (X.double() - table.double().gather(1, q)) ** 2).sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# GPTQ over a codebook
# ---------------------------------------------------------------------------------------------------

def gptq_codebook(W: torch.Tensor, H: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None,
                  *, group_size: int = -1, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> CodebookResult:
    """GPTQ (Frantar et al. 2022) onto a fixed codebook: columns are quantized in order (by decreasing
    ``H_kk`` with ``act_order``), each to the nearest ``codebook[row] * scale[row, group]``, and the
    rounding error is spread over the not-yet-quantized columns with the upper Cholesky factor of the
    damped ``H^-1``, lazily in blocks of ``block_size`` columns (the update of ``quant.gptq``).

    ``codebook`` (1 or N, 2^bits) and ``scales`` (N, G) or None are kept as given (take them from
    :func:`nf`, :func:`fp4`, :func:`kmeans`, :func:`squeezellm`, :func:`piecewise`). Dead inputs
    (``H_kk == 0``) get the code nearest to 0.
    """
    check_weight(W)
    N, K = W.shape
    check_hessian(H, K)
    _check_table(codebook, N)
    L = codebook.shape[1]
    bits = int(math.log2(L))
    gs = check_quant_args(K, bits=bits, group_size=group_size)
    G = -(-K // gs)
    _check_scales(scales, N, G)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    table = codebook.float().expand(N, -1).contiguous()
    vals, order = table.sort(dim=1)
    mid = ((vals[:, 1:] + vals[:, :-1]) / 2).contiguous()
    W, H, _ = prepare_hessian(W, H, damp)
    s_full = torch.ones(N, K) if scales is None else _expand(scales.float(), gs, K)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H, s_full = W[:, perm], H[perm][:, perm], s_full[:, perm]
    Hinv = damped_hinv_chol(H, damp).to(torch.float32)

    Q = torch.empty(N, K, dtype=torch.long)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty(N, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            s = s_full[:, i1 + i]
            pos = torch.searchsorted(mid, (w / s)[:, None])       # (N, 1) index into the sorted table
            Q[:, i1 + i] = order.gather(1, pos)[:, 0]
            deq = vals.gather(1, pos)[:, 0] * s
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return _result(Q, codebook.float().clone(), scales, bits, group_size)
