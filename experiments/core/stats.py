"""Bootstrap intervals over evaluation windows: the noise of a perplexity and of a paired difference.

The unit of resampling is the *evaluation window*, not the token: tokens inside one window share
context, so they are not independent; the windows (non-overlapping spans of one text) are treated as
the independent draws. Every statistic here is a ratio ``sum(numerator) / sum(denominator)`` over
windows (a mean NLL per token is the windows' NLL sums over their token counts; with equal windows,
the mean of the window means):

- :func:`ratio_interval`: the statistic on all windows and a **percentile bootstrap** interval
  (Efron & Tibshirani 1993, ch. 13): ``resamples`` (default 2000) resamples of the windows with
  replacement, drawn by ``numpy.random.default_rng(seed)`` (default seed 0), the statistic on each, and
  the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those (numpy's default linear
  interpolation; default level 0.95). Not BCa, no studentization: with 8-16 windows the interval is
  a rough statement of the spread, and it is narrower than the truth when the windows are few.
- :func:`paired_interval`: the same on the per-window *difference* of two points scored on the same
  windows (e.g. a compressed model's NLL minus the dense model's): both points are resampled with the
  same window indices, so what the two share (hard passages are hard for both) cancels. That is why a
  paired interval is far tighter than two independent perplexity intervals.
- :func:`within_noise`: a paired interval that contains 0 does not separate the two points.

A perplexity interval is ``exp`` of the mean-NLL interval (``exp`` is monotone, so the percentile
interval maps exactly). Fewer than 2 windows give a NaN interval (no spread to resample).

Pure numpy: the rows' reader (``experiments.analysis``) recomputes the same intervals from a table's
``window_nll`` lists, and with the same seed and window count draws the very same resamples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def bootstrap_method(resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = BOOTSTRAP_LEVEL) -> str:
    """The method as one string (the rows' ``bootstrap`` column)."""
    return f"percentile {level:.0%}, {resamples} resamples of the windows, numpy default_rng seed {seed}"


@dataclass(frozen=True)
class Interval:
    """A statistic on all windows and its bootstrap interval (NaN bounds with fewer than 2 windows)."""
    estimate: float
    lo: float
    hi: float
    n: int              # windows

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def map(self, fn) -> "Interval":
        """The interval of a monotone increasing function of the statistic (e.g. ``math.exp``)."""
        return Interval(fn(self.estimate), fn(self.lo), fn(self.hi), self.n)


def _check(name: str, values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-window values, got shape {a.shape}")
    return a


def _check_options(resamples: int, level: float) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer (e.g. {BOOTSTRAP_RESAMPLES}), got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. {BOOTSTRAP_LEVEL}), got {level!r}")


def bootstrap_indices(n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) window indices drawn with replacement; the same ``n`` and ``seed`` give the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float] | None = None, *,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   level: float = BOOTSTRAP_LEVEL) -> Interval:
    """``sum(numerator) / sum(denominator)`` over windows with its percentile bootstrap interval (module
    docstring). ``denominator`` defaults to 1 per window (the mean of the per-window values). A
    non-finite value anywhere gives a non-finite estimate and NaN bounds."""
    num = _check("numerator", numerator)
    den = np.ones_like(num) if denominator is None else _check("denominator", denominator)
    if den.shape != num.shape:
        raise ValueError(f"numerator and denominator must have one value per window each, got {num.size} "
                         f"and {den.size}")
    if not (den > 0).all():
        raise ValueError("denominator (tokens per window) must be positive for every window")
    _check_options(resamples, level)
    estimate = float(num.sum() / den.sum())
    if num.size < 2 or not np.isfinite(num).all():
        return Interval(estimate, math.nan, math.nan, int(num.size))
    idx = bootstrap_indices(num.size, resamples=resamples, seed=seed)
    stats = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(lo), float(hi), int(num.size))


def paired_interval(a: Sequence[float], b: Sequence[float], weights: Sequence[float] | None = None, *,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    level: float = BOOTSTRAP_LEVEL) -> Interval:
    """Mean of ``a - b`` over the same windows (weighted by ``weights``, e.g. tokens per window, when
    ``a``/``b`` are per-window means), with a paired percentile bootstrap interval (module docstring)."""
    a, b = _check("a", a), _check("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same windows on both sides: got {a.size} and {b.size} "
                         f"window values")
    w = np.ones_like(a) if weights is None else _check("weights", weights)
    return ratio_interval((a - b) * w, w, resamples=resamples, seed=seed, level=level)


def within_noise(interval: Interval) -> bool:
    """Whether a paired difference's interval contains 0 (NaN bounds count as noise: nothing shown)."""
    return not (interval.lo > 0 or interval.hi < 0)
