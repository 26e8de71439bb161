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
