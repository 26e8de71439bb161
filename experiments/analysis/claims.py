"""The orderings the project reports, each checked on the committed tables with its paired interval.

    from experiments.analysis.claims import claims_table, claims_summary
    claims_table(quick=False)          # one row per claim: ΔNLL with its 95% interval, the verdict
    python -m experiments summary --only claims       # the same as Markdown (the README's block)

A claim is "point ``better`` has a lower perplexity than point ``worse``" for two points of one sweep
(:data:`CLAIMS`, by point label; a mode whose tables lack either point skips the claim). Both are scored
on the same evaluation windows, so the comparison is *paired*, window by window
(:func:`experiments.analysis.paired.paired_difference`): ΔNLL = NLL(better) - NLL(worse) per token with its
95% percentile bootstrap interval over windows. The verdict:

- ``holds``: the whole interval is below 0;
- ``within noise``: the interval contains 0 (the windows do not separate the two points);
- ``reversed``: the whole interval is above 0.

The same on the second evaluation text (``window_nll2``) where the rows have it; the task accuracy
difference acc(better) - acc(worse) on the same items (``task_correct``, :mod:`experiments.lm.tasks`;
verdict *holds* when its interval is above 0) where both rows were scored on the task; and the spread of
``better``'s perplexity over calibration seeds where the seed tables hold it
(:mod:`experiments.analysis.seeds`). Rows written before the per-window column existed cannot be paired
and say so (``not paired``), never a number. Windows are few (8 full, 8 quick), so a verdict is about
these windows of these texts; it says nothing of other models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.analysis.paired import WITHIN_NOISE, NotPaired, paired_difference, paired_task_difference
from experiments.core.stats import within_noise
from experiments.analysis.plots import RESULTS, results_dir


@dataclass(frozen=True)
class Claim:
    text: str
    sweep: str
    better: str      # point labels (experiments.methods.spec.MethodSpec.label)
    worse: str


CLAIMS = (
    Claim("GPTQ beats RTN at 3 bits (g64)", "quant", "gptq-w3-g64-asym", "rtn-w3-g64-asym"),
    Claim("GPTQ beats RTN at 4 bits (g64)", "quant", "gptq-w4-g64-asym", "rtn-w4-g64-asym"),
    Claim("4-bit beats 3-bit RTN (g64)", "quant", "rtn-w4-g64-asym", "rtn-w3-g64-asym"),
    Claim("SparseGPT beats magnitude at 50% unstructured", "sparsity", "sparsegpt-unstructured-0.5",
          "magnitude-unstructured-0.5"),
    Claim("Wanda beats magnitude at 50% unstructured", "sparsity", "wanda-unstructured-0.5",
          "magnitude-unstructured-0.5"),
    Claim("Wanda beats magnitude at 2:4", "sparsity", "wanda-2:4", "magnitude-2:4"),
    Claim("SparseGPT beats Wanda at 2:4", "sparsity", "sparsegpt-2:4", "wanda-2:4"),
    Claim("whitened SVD beats plain SVD at 50% of the parameters", "lowrank", "whitened_svd-ratio0.5-damp0.001",
          "svd-ratio0.5"),
    Claim("whitened SVD beats plain SVD at 80% of the parameters", "lowrank", "whitened_svd-ratio0.8-damp0.001",
          "svd-ratio0.8"),
    Claim("SqueezeLLM beats GPTQ at 3 bits per channel", "nonuniform", "squeezellm-w3-pc", "gptq-w3-pc-asym"),
    Claim("GPTQ beats RTN at 3 bits per channel", "nonuniform", "gptq-w3-pc-asym", "rtn-w3-pc-asym"),
    Claim("NF4 beats RTN 4-bit at g64", "nonuniform", "nf-w4-g64", "rtn-w4-g64-asym"),
    Claim("NF4 beats RTN 4-bit at g128", "nonuniform", "nf-w4-g128", "rtn-w4-g128-asym"),
    Claim("a zero level helps k-means at 3 bits g128", "nonuniform", "kmeans-w3-g128", "kmeans-w3-g128-nozero"),
    Claim("Fisher weighting helps SqueezeLLM at 3 bits", "nonuniform", "squeezellm-w3-pc", "squeezellm-w3-pc-diagh"),
    Claim("FLAP (global) beats magnitude for 20% of the MLP channels", "structured", "channels-flap-s0.2-global",
          "channels-magnitude-s0.2"),
    Claim("Wanda beats magnitude for 20% of the MLP channels", "structured", "channels-wanda-s0.2",
          "channels-magnitude-s0.2"),
    Claim("FLAP's global search beats its uniform ratio (channels 20%)", "structured", "channels-flap-s0.2-global",
          "channels-flap-s0.2"),
    Claim("Wanda-sp beats magnitude-sp (channels 20%)", "structured", "channels-wanda-sp-s0.2",
          "channels-magnitude-sp-s0.2"),
    Claim("FLAP beats magnitude for 10% of the query heads (global)", "structured", "heads-flap-s0.1-global-query",
          "heads-magnitude-s0.1-global-query"),
    Claim("Wanda beats magnitude for 10% of the query heads (global)", "structured", "heads-wanda-s0.1-global-query",
          "heads-magnitude-s0.1-global-query"),
    Claim("Block Influence beats dropping the last 4 blocks", "structured", "layers-bi-b4", "layers-last-b4"),
    Claim("HQQ beats RTN at 3 bits g128", "modern", "hqq-w3-g128", "rtn-w3-g128-asym"),
    Claim("HQQ beats RTN at 4 bits g64", "modern", "hqq-w4-g64", "rtn-w4-g64-asym"),
    Claim("AWQ beats RTN at 3 bits g128", "modern", "awq-w3-g128-asym", "rtn-w3-g128-asym"),
    Claim("AWQ beats GPTQ at 3 bits g128", "modern", "awq-w3-g128-asym", "gptq-w3-g128-asym"),
    Claim("AWQ + GPTQ beats GPTQ at 3 bits g128", "modern", "awq-w3-g128-asym+gptq", "gptq-w3-g128-asym"),
    Claim("AWQ + GPTQ beats AWQ at 4 bits g128", "modern", "awq-w4-g128-asym+gptq", "awq-w4-g128-asym"),
    Claim("rotations beat RTN at 3 bits g128", "modern", "quarot-w3-g128-asym", "rtn-w3-g128-asym"),
    Claim("rotations + GPTQ beat GPTQ at 3 bits g128", "modern", "quarot-w3-g128-asym+gptq", "gptq-w3-g128-asym"),
    Claim("rotations + GPTQ beat GPTQ at 4 bits g128", "modern", "quarot-w4-g128-asym+gptq", "gptq-w4-g128-asym"),
    # Mixed precision against the uniform format of the same size (or, for 3.0 bits, the next larger one).
    Claim("mixed precision beats RTN w2 g64 at its size (2.5 bits)", "modern", "mixed-b2.5", "rtn-w2-g64-asym"),
    Claim("mixed precision at 3.0 bits beats RTN w3 g128 (3.27 bits)", "modern", "mixed-b3", "rtn-w3-g128-asym"),
    Claim("mixed precision at 3.25 bits beats RTN w3 g128 (3.27 bits)", "modern", "mixed-b3.25", "rtn-w3-g128-asym"),
    Claim("mixed precision beats RTN w3 g64 at its size (3.5 bits)", "modern", "mixed-b3.5", "rtn-w3-g64-asym"),
    Claim("mixed precision at 4.25 bits beats RTN w4 g128 (4.27 bits)", "modern", "mixed-b4.25", "rtn-w4-g128-asym"),
    Claim("mixed precision + GPTQ at 3.25 bits beats GPTQ w3 g128 (3.27 bits)", "modern", "mixed-b3.25+gptq",
          "gptq-w3-g128-asym"),
)

COLUMNS = ("claim", "sweep", "better", "worse", "ppl_better", "ppl_worse", "dnll", "dnll_lo", "dnll_hi", "verdict",
           "dnll2", "dnll2_lo", "dnll2_hi", "verdict2", "dacc", "dacc_lo", "dacc_hi", "verdict_task", "task_n", "seeds",
           "seed_ppl_min", "seed_ppl_max")
HOLDS, REVERSED, NOT_PAIRED = "holds", "reversed", "not paired"


def _verdict(diff) -> str:
    if diff.verdict == WITHIN_NOISE:
        return WITHIN_NOISE
    return HOLDS if diff.dnll.hi < 0 else REVERSED


def _compare(better, worse, column: str) -> tuple[float, float, float, str]:
    try:
        d = paired_difference(worse, better, column)   # better - worse
    except NotPaired:
        return math.nan, math.nan, math.nan, NOT_PAIRED
    return d.dnll.estimate, d.dnll.lo, d.dnll.hi, _verdict(d)


def _compare_task(better, worse) -> tuple[float, float, float, str, int]:
    try:
        d = paired_task_difference(worse, better)   # acc(better) - acc(worse)
    except NotPaired:
        return math.nan, math.nan, math.nan, NOT_PAIRED, 0
    return d.estimate, d.lo, d.hi, WITHIN_NOISE if within_noise(d) else (HOLDS if d.lo > 0 else REVERSED), d.n


def _table(name: str, quick: bool, root: Path) -> pd.DataFrame | None:
    path = results_dir(quick, root) / f"sweep_{name}.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else None


def _seed_range(name: str, label: str, quick: bool, root: Path) -> tuple[int, float, float]:
    from experiments.analysis.seeds import seed_rows, seed_spread
    try:
        spread = seed_spread(seed_rows(name, quick=quick, root=root))
    except (ValueError, KeyError):
        return 0, math.nan, math.nan
    hit = spread[spread["point"] == label]
    if not len(hit) or int(hit.iloc[0]["n_seeds"]) < 2:
        return 0, math.nan, math.nan
    r = hit.iloc[0]
    return int(r["n_seeds"]), float(r["min"]), float(r["max"])


def claims_table(quick: bool = False, root: str | Path = RESULTS, claims=None) -> pd.DataFrame:
    """One row per claim of ``claims`` (default :data:`CLAIMS`) whose two points are in the tables (module
    docstring); columns :data:`COLUMNS`."""
    root = Path(root)
    claims = CLAIMS if claims is None else claims
    tables: dict[str, pd.DataFrame | None] = {}
    out = []
    for c in claims:
        if c.sweep not in tables:
            tables[c.sweep] = _table(c.sweep, quick, root)
        df = tables[c.sweep]
        if df is None:
            continue
        by_label = {r["point"]: r for _, r in df.iterrows()}
        if c.better not in by_label or c.worse not in by_label:
            continue
        b, w = by_label[c.better], by_label[c.worse]
        d, lo, hi, verdict = _compare(b, w, "window_nll")
        d2, lo2, hi2, verdict2 = _compare(b, w, "window_nll2")
        da, loa, hia, verdict_task, n_items = _compare_task(b, w)
        n, smin, smax = _seed_range(c.sweep, c.better, quick, root)
        out.append({"claim": c.text, "sweep": c.sweep, "better": c.better, "worse": c.worse,
                    "ppl_better": float(b["ppl"]), "ppl_worse": float(w["ppl"]), "dnll": d, "dnll_lo": lo,
                    "dnll_hi": hi, "verdict": verdict, "dnll2": d2, "dnll2_lo": lo2, "dnll2_hi": hi2,
                    "verdict2": verdict2, "dacc": da, "dacc_lo": loa, "dacc_hi": hia,
                    "verdict_task": verdict_task, "task_n": n_items, "seeds": n, "seed_ppl_min": smin, "seed_ppl_max": smax})
    return pd.DataFrame(out, columns=list(COLUMNS))


def _ppl(v: float) -> str:
    return f"{v:.4g}" if v < 1e4 else f"{v:.3g}"


def _interval(d: float, lo: float, hi: float, verdict: str) -> str:
    if verdict == NOT_PAIRED:
        return "not paired (row predates `window_nll`)"
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] **{verdict}**" if verdict != HOLDS else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] holds"


def claims_summary(quick: bool = False, root: str | Path = RESULTS) -> str:
    """:func:`claims_table` as Markdown (the README's ``claims`` block); the task column only where some
    claim has both rows scored on the task."""
    t = claims_table(quick, root)
    if not len(t):
        return "(no claim has both of its points in these tables)"
    task = bool((t["verdict_task"] != NOT_PAIRED).any())
    head = "| claim | ppl (better vs worse) | ΔNLL/token, 95% CI, verdict | on the second text |"
    head += " task accuracy, better − worse |" if task else ""
    lines = [head + " better's ppl over calibration seeds |", "|---|---|---|---|" + ("---|" if task else "") + "---|"]
    for _, r in t.iterrows():
        seeds = (f"{int(r['seeds'])} seeds: {_ppl(r['seed_ppl_min'])}–{_ppl(r['seed_ppl_max'])}"
                 if r["seeds"] else "")
        second = (_interval(r["dnll2"], r["dnll2_lo"], r["dnll2_hi"], r["verdict2"])
                  if r["verdict2"] != NOT_PAIRED else "")
        acc = (_interval(r["dacc"], r["dacc_lo"], r["dacc_hi"], r["verdict_task"])
               if r["verdict_task"] != NOT_PAIRED else "")
        lines.append(f"| {r['claim']} (`{r['sweep']}`) | {_ppl(r['ppl_better'])} vs {_ppl(r['ppl_worse'])} "
                     f"| {_interval(r['dnll'], r['dnll_lo'], r['dnll_hi'], r['verdict'])} | {second} |"
                     + (f" {acc} |" if task else "") + f" {seeds} |")
    n_paired = int((t["verdict"] != NOT_PAIRED).sum())
    n_task = int((t["verdict_task"] != NOT_PAIRED).sum())
    return ("ΔNLL = NLL(better) − NLL(worse) per token on the same evaluation windows, 95% paired percentile "
            "bootstrap over windows (`experiments.analysis.claims`); *holds*: the interval is below 0, "
            "**within noise**: it contains 0, **reversed**: it is above 0. "
            + (f"Task accuracy: acc(better) − acc(worse) on the same {_task_items(t)} multiple-choice items, paired "
               "bootstrap over items (*holds* above 0); "
               f"{n_task} of {len(t)} claims have both rows scored on the task. " if task else "")
            + f"{n_paired} of {len(t)} claims have both rows with per-window NLL"
            + ("" if n_paired == len(t) else "; the others are rows measured before the column existed "
               "(rerun that sweep to pair them)") + ".\n\n" + "\n".join(lines))


def _task_items(t: pd.DataFrame) -> str:
    """How many items the task comparisons used (the rows' task_n), e.g. "100"."""
    return "/".join(sorted({str(int(x)) for x in t.loc[t["verdict_task"] != NOT_PAIRED, "task_n"]}, key=int))
