"""experiments.analysis.claims: each claimed ordering checked with its paired interval on the tables."""
import json

import numpy as np
import pandas as pd

from experiments.analysis.claims import HOLDS, NOT_PAIRED, REVERSED, Claim, claims_summary, claims_table
from experiments.analysis.paired import WITHIN_NOISE

CTX = {"model": "m", "corpus": "c", "evaluation_text": "P&P", "text_sha256": "abc", "seqlen": "512",
       "eval_token_budget": "8192", "evaluation_text2": "Emma", "text2_sha256": "e", "eval2_windows": "8"}


def _row(point, nll, nll2=None, ppl=None):
    r = {**CTX, "point": point, "ppl": str(ppl or float(np.exp(np.mean(nll)))), "window_nll": json.dumps(list(nll))}
    r["window_nll2"] = json.dumps(list(nll2)) if nll2 is not None else ""
    return r


def _write(root, name, rows):
    pd.DataFrame(rows).to_csv(root / f"sweep_{name}.csv", index=False)


def test_verdicts_on_both_texts_and_rows_that_cannot_be_paired(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(3.3, 0.3, 8)
    base2 = rng.normal(3.5, 0.3, 8)
    rows = [_row("good", base, base2 + 0.2), _row("bad", base + 0.3 + rng.normal(0, 0.01, 8), base2),
            _row("twin", base + rng.normal(0, 0.01, 8), base2),
            {**_row("old", base), "window_nll": ""}]
    _write(tmp_path, "s", rows)
    claims = (Claim("good beats bad", "s", "good", "bad"), Claim("twin beats good", "s", "twin", "good"),
              Claim("good beats old", "s", "good", "old"), Claim("absent", "s", "good", "nowhere"),
              Claim("no table", "other", "a", "b"))
    t = claims_table(root=tmp_path, claims=claims).set_index("claim")
    assert list(t.index) == ["good beats bad", "twin beats good", "good beats old"]   # absent points: skipped
    g = t.loc["good beats bad"]
    assert g["verdict"] == HOLDS and g["dnll_hi"] < 0 and abs(g["dnll"] + 0.3) < 0.02
    assert g["verdict2"] == REVERSED and g["dnll2_lo"] > 0        # on the second text it goes the other way
    assert t.loc["twin beats good", "verdict"] == WITHIN_NOISE
    assert t.loc["good beats old", "verdict"] == NOT_PAIRED and np.isnan(t.loc["good beats old", "dnll"])


def test_summary_names_each_verdict(tmp_path, monkeypatch):
    from experiments.analysis import claims
    rng = np.random.default_rng(1)
    base = rng.normal(3.3, 0.3, 8)
    _write(tmp_path, "quant", [_row("gptq-w3-g64-asym", base), _row("rtn-w3-g64-asym", base + 0.2),
                               _row("rtn-w4-g64-asym", base + 0.4 + rng.normal(0, 0.002, 8))])
    text = claims_summary(root=tmp_path)
    assert "| GPTQ beats RTN at 3 bits (g64) (`quant`) |" in text and " holds |" in text
    assert "**reversed**" in text           # 4-bit "beats" 3-bit is here the other way round
    assert "2 of 2 claims have both rows" in text
    monkeypatch.setattr(claims, "CLAIMS", ())
    assert claims_summary(root=tmp_path).startswith("(no claim")


def _with_task(row, correct, n=None, text="Emma 2nd half"):
    """``row`` scored on the task with per-item answers ``correct`` (list of bools)."""
    import torch

    from experiments.lm.tasks import encode_correct
    return {**row, "task_text": text, "task_n": str(n or len(correct)), "task_k": "4",
            "task_correct": encode_correct(torch.tensor(correct, dtype=torch.bool))}


def test_task_accuracy_is_compared_item_by_item(tmp_path):
    """acc(better) - acc(worse) on the same items with a paired bootstrap interval: a gap of 40 of 100 items
    holds, one item either way is within noise, rows without the task or on other items are not paired;
    the Markdown grows its task column only when some claim has it."""
    from experiments.analysis.paired import NotPaired, paired_task_difference
    rng = np.random.default_rng(2)
    base = rng.normal(3.3, 0.3, 8)
    dense = [i % 5 != 0 for i in range(100)]                      # 80 right
    weak = [c and i % 2 == 0 for i, c in enumerate(dense)]        # 40 right, all of them also right in dense
    near = list(dense)
    near[1] = False                                                # one item fewer
    rows = [_with_task(_row("dense", base), dense), _with_task(_row("weak", base + 0.3), weak),
            _with_task(_row("near", base + 0.01), near), _row("untasked", base + 0.2),
            _with_task(_row("other", base + 0.2), weak, text="another text")]
    d = paired_task_difference(rows[1], rows[0])
    assert abs(d.estimate - 0.4) < 1e-12 and d.lo > 0.25 and d.n == 100
    for a, b in ((rows[0], rows[3]), (rows[0], rows[4])):
        try:
            paired_task_difference(a, b)
            raise AssertionError("expected NotPaired")
        except NotPaired as e:
            assert "task" in str(e)
    _write(tmp_path, "s", rows)
    claims = (Claim("dense beats weak", "s", "dense", "weak"), Claim("near beats dense", "s", "near", "dense"),
              Claim("dense beats untasked", "s", "dense", "untasked"))
    t = claims_table(root=tmp_path, claims=claims).set_index("claim")
    assert t.loc["dense beats weak", "verdict_task"] == HOLDS and abs(t.loc["dense beats weak", "dacc"] - 0.4) < 1e-12
    assert t.loc["near beats dense", "verdict_task"] == WITHIN_NOISE and t.loc["near beats dense", "dacc"] < 0
    assert t.loc["dense beats untasked", "verdict_task"] == NOT_PAIRED
    t2 = claims_table(root=tmp_path, claims=claims[2:])
    assert (t2["verdict_task"] == NOT_PAIRED).all()


def test_summary_has_a_task_column_only_when_a_claim_is_scored_on_the_task(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(3.3, 0.3, 8)
    right = [i % 3 != 0 for i in range(60)]
    _write(tmp_path, "quant", [_row("gptq-w3-g64-asym", base), _row("rtn-w3-g64-asym", base + 0.2)])
    assert "task accuracy" not in claims_summary(root=tmp_path)
    _write(tmp_path, "quant", [_with_task(_row("gptq-w3-g64-asym", base), right),
                               _with_task(_row("rtn-w3-g64-asym", base + 0.2), [False] * 60)])
    text = claims_summary(root=tmp_path)
    assert "task accuracy, better − worse" in text and "same 60 multiple-choice items" in text
    assert "+0.667 [" in text and "1 of 1 claims have both rows scored on the task" in text
