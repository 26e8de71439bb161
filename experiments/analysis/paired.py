"""Paired comparisons of two sweep rows: is a difference a finding or within noise?

Every point of a sweep table is scored on the same evaluation windows, and each row keeps its
per-window mean NLL (``window_nll``; ``window_nll2`` on the second text; see
``experiments.run.point``). Two rows of one table therefore give a *paired* difference, window by
window: :func:`paired_difference` returns the mean NLL difference ``b - a`` per token with its 95%
percentile bootstrap interval over the windows (the same method and seed as the rows' own intervals,
:mod:`experiments.core.stats`), the perplexity ratio ``exp`` of it, and a verdict:

- ``"within noise"`` when the interval contains 0 (the windows do not separate the two points);
- ``"a lower"`` / ``"b lower"`` when the whole interval lies on one side (``a lower`` means ``a`` has the
  lower NLL, i.e. is the better model on this text).

Rows without ``window_nll`` (tables written before the column existed) or on other windows (another
model, text, seqlen or budget: the context columns differ, or the window counts do) give
:class:`NotPaired` naming what is missing, never a number. A verdict is about these windows of this
text: it says nothing of calibration noise (another calibration sample moves a calibrated point) nor of
other texts (``window_nll2``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

from experiments.core.stats import BOOTSTRAP_LEVEL, Interval, paired_interval, within_noise

# What two rows must share for their windows to be the same windows.
SAME_WINDOWS = ("model", "corpus", "evaluation_text", "text_sha256", "seqlen", "eval_token_budget")
SAME_WINDOWS_2 = ("model", "evaluation_text2", "text2_sha256", "seqlen", "eval2_windows")
WITHIN_NOISE = "within noise"


class NotPaired(ValueError):
    """Two rows that cannot be compared window by window."""


@dataclass(frozen=True)
class PairedDifference:
    """``b - a`` in mean NLL per token on the same windows, with its interval and verdict."""
    a: str                  # the rows' point labels
    b: str
    dnll: Interval          # mean NLL of b minus that of a, per token
    verdict: str            # "within noise", "a lower" or "b lower"

    @property
    def ppl_ratio(self) -> Interval:
        """ppl(b) / ppl(a) with its interval (``exp`` of :attr:`dnll`)."""
        return self.dnll.map(math.exp)

    def describe(self) -> str:
        """One line, e.g. ``rtn-w4-g64-asym vs nf4-g64: ΔNLL +0.0052 [-0.0011, +0.0117] per token (ppl x1.005): within noise``."""
        d = self.dnll
        return (f"{self.b} vs {self.a}: ΔNLL {d.estimate:+.4g} [{d.lo:+.4g}, {d.hi:+.4g}] per token "
                f"(ppl x{math.exp(d.estimate):.4g}, {BOOTSTRAP_LEVEL:.0%} paired bootstrap over {d.n} windows): "
                f"{self.verdict}")


def _cell(row: Mapping, column: str) -> str:
    v = row.get(column)
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v)


def window_values(row: Mapping, column: str = "window_nll") -> list[float]:
    """A row's per-window values (a JSON list cell); :class:`NotPaired` when the cell is empty or not one."""
    text = _cell(row, column)
    label = _cell(row, "point") or "a row"
    if not text:
        raise NotPaired(f"{label} has no {column} (a table written before the per-window column existed): "
                        f"measure it again to compare it window by window")
    try:
        values = json.loads(text)
    except ValueError as e:
        raise NotPaired(f"{label}: {column} is not a JSON list of numbers ({e})") from e
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise NotPaired(f"{label}: {column} is not a non-empty JSON list of numbers")
    return [float(v) for v in values]


def paired_difference(a: Mapping, b: Mapping, column: str = "window_nll") -> PairedDifference:
    """``b - a`` on the same windows (module docstring); ``a``/``b`` are table rows (dicts or pandas rows).
    ``column`` ``window_nll2`` compares them on the second evaluation text."""
    same = SAME_WINDOWS_2 if column == "window_nll2" else SAME_WINDOWS
    differ = [c for c in same if _cell(a, c) != _cell(b, c)]
    if differ:
        what = "; ".join(f"{c}: {_cell(a, c)!r} vs {_cell(b, c)!r}" for c in differ)
        raise NotPaired(f"{_cell(a, 'point')} and {_cell(b, 'point')} were not scored on the same windows ({what})")
    va, vb = window_values(a, column), window_values(b, column)
    if len(va) != len(vb):
        raise NotPaired(f"{_cell(a, 'point')} has {len(va)} windows, {_cell(b, 'point')} {len(vb)}: not the same windows")
    # The windows hold the same number of tokens (seqlen - 1 each), so the mean of the window means is the
    # mean per token.
    d = paired_interval(vb, va)
    verdict = WITHIN_NOISE if within_noise(d) else ("b lower" if d.hi < 0 else "a lower")
    return PairedDifference(_cell(a, "point"), _cell(b, "point"), d, verdict)


# What two rows must share for their task items to be the same items (experiments.lm.tasks).
SAME_ITEMS = ("model", "task_text", "task_n", "task_k")


def paired_task_difference(a: Mapping, b: Mapping, column: str = "task_correct") -> Interval:
    """acc(``b``) - acc(``a``) on the same task items (``task_correct``, the per-item answers a row keeps;
    ``task_correct_norm`` for acc_norm), with a paired percentile bootstrap interval over the items (the
    method and seed of :func:`paired_difference`; the items counted as independent draws).
    :class:`NotPaired` when either row has no task answers or the items differ."""
    from experiments.lm.tasks import decode_correct
    for row in (a, b):
        if not _cell(row, column) or not _cell(row, "task_n"):
            raise NotPaired(f"{_cell(row, 'point') or 'a row'} has no {column} (scored without the task, "
                            f"task_items 0, or before the column existed)")
    differ = [c for c in SAME_ITEMS if _cell(a, c) != _cell(b, c)]
    if differ:
        what = "; ".join(f"{c}: {_cell(a, c)!r} vs {_cell(b, c)!r}" for c in differ)
        raise NotPaired(f"{_cell(a, 'point')} and {_cell(b, 'point')} were not scored on the same task items ({what})")
    n = int(float(_cell(a, "task_n")))
    try:
        ca, cb = (decode_correct(_cell(r, column), n).double().tolist() for r in (a, b))
    except ValueError as e:
        raise NotPaired(f"{_cell(a, 'point')} / {_cell(b, 'point')}: {column} does not hold {n} answers ({e})") from e
    return paired_interval(cb, ca)


def ordering_note(best: Mapping, other: Mapping) -> str | None:
    """For a statement "``best`` is better than ``other``": None when the windows separate them (or
    cannot say: rows without ``window_nll``), else a short note that the two are within noise."""
    try:
        diff = paired_difference(best, other)
    except NotPaired:
        return None
    if diff.verdict != WITHIN_NOISE:
        return None
    return (f"within noise of {diff.b} (ΔNLL {diff.dnll.estimate:+.3g} [{diff.dnll.lo:+.3g}, {diff.dnll.hi:+.3g}] "
            f"per token)")
