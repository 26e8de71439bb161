"""The spread of a sweep's points over calibration seeds (for error bars), read from the result tables.

A point that lists ``calib_seeds`` in its sweep file (``experiments.run.sweep_config``) has its row at the
sweep's own seed in ``sweep_<name>.csv`` and its rows at the other seeds in ``sweep_<name>.seed<k>.csv``.
:func:`seed_rows` reads them together; :func:`seed_spread` gives one row per point with the mean,
standard deviation (sample, ``ddof=1``), minimum and maximum of a metric over its seeds::

    from experiments.analysis.seeds import seed_rows, seed_spread
    spread = seed_spread(seed_rows("quant", quick=False))      # ppl by default
    spread[spread["n_seeds"] > 1]                              # the points measured at several seeds

Nothing here measures anything. Tables must agree on every context column except ``seed``
(``experiments.core.runs.SWEEP_CONTEXT``): rows of another model, text or machine are never pooled.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from experiments.analysis.plots import RESULTS, results_dir
from experiments.core.results import ContextMismatch, check_single_context
from experiments.core.runs import SWEEP_CONTEXT

SPREAD_COLUMNS = ("sweep", "point", "spec", "n_seeds", "seeds", "mean", "std", "min", "max")


def seed_tables(name: str, *, quick: bool, root: str | Path = RESULTS) -> list[Path]:
    """``sweep_<name>.csv`` (if present) and its seed tables ``sweep_<name>.seed<k>.csv``, by seed."""
    d = results_dir(quick, root)
    pattern = re.compile(rf"sweep_{re.escape(name)}\.seed(\d+)\.csv")
    seeded = sorted((int(m.group(1)), p) for p in d.glob(f"sweep_{name}.seed*.csv") if (m := pattern.fullmatch(p.name)))
    base = d / f"sweep_{name}.csv"
    return ([base] if base.exists() else []) + [p for _, p in seeded]


def seed_rows(name: str, *, quick: bool, root: str | Path = RESULTS) -> pd.DataFrame:
    """The rows of sweep ``name`` at every seed (its table and its seed tables), with a ``table`` column.

    ``ContextMismatch`` when a table mixes contexts or two tables differ in a context column other
    than ``seed``; ``FileNotFoundError`` when there is no table at all."""
    paths = seed_tables(name, quick=quick, root=root)
    if not paths:
        raise FileNotFoundError(f"no sweep_{name}.csv or sweep_{name}.seed<k>.csv in {results_dir(quick, root)}")
    frames, ref = [], None
    others = [c for c in SWEEP_CONTEXT if c != "seed"]
    for p in paths:
        df = pd.read_csv(p)
        ctx = check_single_context(df.to_dict("records"), SWEEP_CONTEXT, str(p))
        ctx = {c: ctx[c] for c in others if c in ctx}
        if ref is None:
            ref = (p, ctx)
        else:
            diff = [c for c in others if c in ctx and c in ref[1] and ctx[c] != ref[1][c]]
            if diff:
                what = "; ".join(f"{c}: {ref[1][c]!r} vs {ctx[c]!r}" for c in diff)
                raise ContextMismatch(f"{p} and {ref[0]} differ in more than the seed ({what}); their rows are "
                                      f"not seeds of the same points")
        frames.append(df.assign(table=p.name))
    return pd.concat(frames, ignore_index=True)


def _canon(spec) -> str:
    try:
        return json.dumps(json.loads(spec), sort_keys=True)
    except (TypeError, ValueError):
        return str(spec)


def seed_spread(rows: pd.DataFrame, metric: str = "ppl") -> pd.DataFrame:
    """One row per point of ``rows`` (same label and spec; see :func:`seed_rows`): ``n_seeds``, ``seeds``
    (sorted, ``;``-separated), and the ``mean``, ``std`` (sample; NaN for one seed), ``min`` and ``max`` of
    ``metric`` over its seeds. Points keep their first-seen order; the ``sweep`` column is the base sweep
    (a seed sweep's name without ``.seed<k>``). ValueError when a point has two rows at one seed or
    ``metric`` is not a column."""
    if metric not in rows.columns:
        raise ValueError(f"metric={metric!r} is not a column of the rows; numeric columns include "
                         f"{', '.join(c for c in ('ppl', 'nll', 'bits_per_weight') if c in rows.columns)}")
    for col in ("point", "spec", "seed"):
        if col not in rows.columns:
            raise ValueError(f"rows lack the {col!r} column: pass sweep table rows (seed_rows)")
    if not len(rows):
        return pd.DataFrame(columns=list(SPREAD_COLUMNS))
    df = rows.assign(_spec=rows["spec"].map(_canon), _value=pd.to_numeric(rows[metric], errors="coerce"),
                     _seed=pd.to_numeric(rows["seed"], errors="coerce"))
    out = []
    for (point, spec), g in df.groupby(["point", "_spec"], sort=False):
        dup = g["_seed"][g["_seed"].duplicated()]
        if len(dup):
            raise ValueError(f"point {point} has {len(g)} rows but seeds {sorted(g['_seed'].tolist())}: two rows at "
                             f"seed {int(dup.iloc[0])}; pass one row per point and seed")
        values = g["_value"].tolist()
        sweeps = g["sweep"].astype(str).str.replace(r"\.seed\d+$", "", regex=True) if "sweep" in g else pd.Series([""])
        out.append({"sweep": sweeps.iloc[0], "point": point, "spec": spec, "n_seeds": len(g),
                    "seeds": ";".join(str(int(s)) for s in sorted(g["_seed"])),
                    "mean": sum(values) / len(values),
                    "std": pd.Series(values).std(ddof=1) if len(values) > 1 else math.nan,
                    "min": min(values), "max": max(values)})
    return pd.DataFrame(out, columns=list(SPREAD_COLUMNS))
