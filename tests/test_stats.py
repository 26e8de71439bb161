"""Bootstrap intervals over windows (experiments.core.stats) and paired comparisons of rows
(experiments.analysis.paired)."""
import json
import math

import numpy as np
import pytest

from experiments.analysis.paired import NotPaired, ordering_note, paired_difference
from experiments.core import stats


def test_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 0.2, size=16)
    a, b = stats.ratio_interval(x), stats.ratio_interval(x)
    assert a == b, "same values, same seed: the same interval"
    assert a.lo < a.estimate < a.hi and a.estimate == pytest.approx(x.mean()) and a.n == 16
    assert stats.ratio_interval(x, seed=1) != a, "the seed is what draws the resamples"


def test_interval_width_is_the_standard_error_of_the_window_means():
    """A percentile bootstrap of a mean over windows is ~ mean +- 1.96 sd / sqrt(n) for normal data: an
    interval over tokens, or one using the spread of the values instead of the mean, is far off."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, size=400)
    iv = stats.ratio_interval(x)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert (iv.hi - iv.lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.1)


def test_ratio_weights_windows_by_their_tokens():
    num, den = [10.0, 1.0], [10.0, 1.0]       # window means 1 and 1 -> 1; unweighted sums would differ
    assert stats.ratio_interval(num, den).estimate == 1.0
    assert stats.ratio_interval([2.0, 4.0], [1.0, 3.0]).estimate == pytest.approx(6 / 4)


def test_paired_interval_is_tighter_than_the_difference_of_two_intervals():
    """Hard windows are hard for both points: pairing cancels what they share."""
    rng = np.random.default_rng(1)
    shared = rng.normal(3.0, 0.5, size=16)
    a = shared + rng.normal(0, 0.01, size=16)
    b = shared + 0.02 + rng.normal(0, 0.01, size=16)
    d = stats.paired_interval(b, a)
    ia, ib = stats.ratio_interval(a), stats.ratio_interval(b)
    assert d.hi - d.lo < 0.2 * (ia.hi - ia.lo)
    assert d.lo > 0 and not stats.within_noise(d)       # b is worse, and the windows say so
    assert ia.contains(ib.estimate)                     # which two unpaired intervals cannot tell


def test_few_windows_and_nonfinite_values_give_nan_bounds():
    one = stats.ratio_interval([3.0])
    assert one.estimate == 3.0 and math.isnan(one.lo) and math.isnan(one.hi)
    bad = stats.ratio_interval([3.0, math.inf])
    assert math.isinf(bad.estimate) and math.isnan(bad.lo)
    assert stats.within_noise(one), "no spread measured: nothing is shown to differ"


@pytest.mark.parametrize("call, match", [
    (lambda: stats.ratio_interval([]), "non-empty 1-D"),
    (lambda: stats.ratio_interval([1.0, 2.0], [1.0]), "one value per window"),
    (lambda: stats.ratio_interval([1.0, 2.0], [1.0, 0.0]), "must be positive"),
    (lambda: stats.ratio_interval([1.0, 2.0], resamples=0), "resamples must be a positive integer"),
    (lambda: stats.ratio_interval([1.0, 2.0], level=95), "level must lie strictly between 0 and 1"),
    (lambda: stats.paired_interval([1.0, 2.0], [1.0]), "same windows on both sides"),
], ids=["empty", "shapes", "zero-tokens", "resamples", "level", "paired-shapes"])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_method_string_states_the_method():
    m = stats.bootstrap_method()
    assert "percentile" in m and "2000 resamples" in m and "seed 0" in m and "95%" in m


# --- paired comparisons of table rows ---------------------------------------------------------------

def _row(point, values, **ctx):
    base = {"model": "m", "corpus": "c", "evaluation_text": "P&P", "text_sha256": "abc", "seqlen": "512",
            "eval_token_budget": "8192"}
    return {**base, **ctx, "point": point, "window_nll": json.dumps(values)}


def test_paired_difference_verdicts():
    rng = np.random.default_rng(2)
    shared = rng.normal(3.2, 0.4, size=16)
    a = _row("a", list(shared))
    worse = _row("worse", list(shared + 0.05 + rng.normal(0, 0.005, 16)))
    same = _row("same", list(shared + rng.normal(0, 0.005, 16)))
    d = paired_difference(a, worse)
    assert d.verdict == "a lower" and d.dnll.lo > 0 and d.ppl_ratio.estimate > 1
    assert paired_difference(worse, a).verdict == "b lower"
    assert paired_difference(a, same).verdict == "within noise"
    assert "within noise" in paired_difference(a, same).describe()
    assert ordering_note(a, same).startswith("within noise of same")
    assert ordering_note(a, worse) is None


def test_rows_without_window_nll_or_on_other_windows_are_not_paired():
    a = _row("a", [3.0, 3.1])
    old = {k: v for k, v in _row("old", [3.0, 3.1]).items() if k != "window_nll"}
    with pytest.raises(NotPaired, match="old has no window_nll"):
        paired_difference(a, old)
    assert ordering_note(a, old) is None, "an old table's rows: no note, no error"
    with pytest.raises(NotPaired, match="seqlen: '512' vs '256'"):
        paired_difference(a, _row("b", [3.0, 3.1], seqlen="256"))
    with pytest.raises(NotPaired, match="2 windows, b 3"):
        paired_difference(a, _row("b", [3.0, 3.1, 3.2]))
    with pytest.raises(NotPaired, match="not a JSON list"):
        paired_difference(a, {**a, "point": "b", "window_nll": "3.0;3.1"})


def test_pandas_rows_with_empty_cells_are_not_paired():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame([_row("a", [3.0, 3.1]), {**_row("b", [3.0, 3.1]), "window_nll": float("nan")}])
    with pytest.raises(NotPaired, match="b has no window_nll"):
        paired_difference(df.iloc[0], df.iloc[1])
