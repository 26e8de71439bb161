"""Paper-style figures drawn from the result tables (the notebooks call these; so does ``reproduce``).

Every figure is regenerated from the result tables by code: nothing here computes a result, it only
reads the tables that ``experiments.run.sweep``, ``experiments.measure.latency`` and ``experiments.measure.roofline`` wrote,
either the committed reference (``results/``) or a run directory (``runs/<NAME>/``, ``experiments.core.runs``).

Readers never merge contexts silently: a sweep table must hold one context (model, corpus, settings,
machine) and the model a notebook asks for; a latency table holding several machines is refused by
the Pareto figure and split per machine by :func:`model_layer_speedup` (never summed across them).

Conventions: perplexity on a log axis (it spans orders of magnitude once a model this small breaks),
the dense baseline as a dashed reference line, points that alias the default model's Q4_1 source grid
drawn hollow and named in the legend (they reproduce the stored weights exactly, so they are not a real
measurement of 4-bit accuracy), CPU latencies labelled as CPU latencies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib.pyplot as plt
import pandas as pd

from experiments.core.results import ContextMismatch, check_single_context
from experiments.core.runs import MEASURE_CONTEXT, REFERENCE, REPO, SWEEP_CONTEXT, SWEEP_CONTEXT_ADDED, \
    default_run_name, is_reference, runs_root

RESULTS = REFERENCE
SWEEPS = ("quant", "sparsity", "lowrank", "combo", "nonuniform", "structured", "modern")
SOURCE_GRID_NOTE = "aliases the Q4_1 source grid (reproduces the stored weights; not a real 4-bit result)"

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False, "font.size": 9,
                     "legend.fontsize": 7, "legend.frameon": False})


class NoResults(FileNotFoundError):
    """No table of the requested model/context where a reader looked."""


def results_dir(quick: bool, root: str | Path = RESULTS) -> Path:
    """Quick runs write under ``<root>/quick/`` so they never mix with full runs."""
    return Path(root) / "quick" if quick else Path(root)


def notebook_root(model: str = "default", results_dir: str | Path | None = None) -> Path:
    """Where a notebook reads its tables: ``results_dir`` if given (relative to the repository), else the
    committed reference ``results/`` for the default model and the model's default run directory
    (``runs/local-<model>``, where ``python -m experiments run --model M`` writes) for any other."""
    if results_dir is not None:
        p = Path(results_dir).expanduser()
        return p if p.is_absolute() else REPO / p
    return RESULTS if model == "default" else runs_root() / default_run_name(model)


def figures_dir_for(root: str | Path, quick: bool) -> Path:
    """Figures go beside the tables they show; those of the reference tables go to ``build/figures``
    (``promote`` is what updates the committed ``results/figures``), so reading never edits tracked files."""
    if is_reference(root):
        return REPO / "build" / "figures" / ("quick" if quick else "")
    return results_dir(quick, root) / "figures"


def _where(root: Path) -> str:
    return "the reference results" if is_reference(root) else f"run directory {root}"


def sweep_table(name: str, *, quick: bool, run_missing: bool = False, model: str = "default",
                root: str | Path = RESULTS) -> pd.DataFrame:
    """The long table of sweep ``name`` for ``model`` under ``root``.

    Refuses (:class:`NoResults`) a table of another model and (``ContextMismatch``) one mixing several
    contexts. A missing table is run first when ``run_missing`` and ``root`` is a run directory (the
    reference ``results/`` is never written here).
    """
    from experiments.lm.models import model_name

    root = Path(root)
    path = results_dir(quick, root) / f"sweep_{name}.csv"
    how = (f"`python -m experiments run {name}{' --quick' if quick else ''}"
           f"{'' if model == 'default' else f' --model {model}'}`")
    if not path.exists():
        if not run_missing or is_reference(root):
            raise NoResults(f"no {name} results for model {model!r} in {_where(root)} ({path} does not exist); "
                            f"run {how} (it writes {runs_root() / default_run_name(model)}) and read that "
                            f"directory (results_dir=...), or pass run_missing=True with a run directory")
        from experiments.run.sweep import run_sweeps
        from experiments.run.sweep_config import resolve_sweeps
        run_sweeps(resolve_sweeps(name), quick=quick, model=model, out_dir=root)
    df = pd.read_csv(path)
    check_single_context(df.to_dict("records"), SWEEP_CONTEXT, str(path), added=SWEEP_CONTEXT_ADDED)
    want = model_name(model)
    have = str(df["model"].iloc[0]) if len(df) else ""
    if have != want:
        raise NoResults(f"{path} holds results for model {have!r}, not {want!r} (model={model!r}): no {name} "
                        f"results for that model in {_where(root)}; run {how} and read its run directory "
                        f"(results_dir=...)")
    df["aliases_source_grid"] = df["aliases_source_grid"].astype(str).str.lower() == "true"
    return df


def optional_table(path: str | Path) -> pd.DataFrame | None:
    path = Path(path)
    return pd.read_csv(path) if path.exists() else None


def measurement_table(path: str | Path) -> pd.DataFrame | None:
    """A latency/decode table, or None when missing; ``ContextMismatch`` when it mixes machines."""
    df = optional_table(path)
    if df is not None:
        check_single_context(df.to_dict("records"), MEASURE_CONTEXT, str(path))
    return df


def roofline_table(quick: bool, root: str | Path = RESULTS) -> pd.DataFrame | None:
    """The roofline model table of ``root`` (its ``quick/`` copy first: the model is the same in both modes)."""
    for d in (results_dir(quick, root), Path(root)):
        if (d / "roofline_model.csv").exists():
            return pd.read_csv(d / "roofline_model.csv")
    return None


def show(fig: plt.Figure) -> None:
    """Display ``fig`` once in a notebook and close it (an open figure would be drawn a second time by the
    inline backend at the end of the cell)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # no IPython: nothing to display
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    plt.close(fig)


def _legend(ax, **kw) -> None:
    """A legend only when something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def dense_ppl(df: pd.DataFrame) -> float | None:
    dense = df[df["method"] == "dense"]
    return float(dense["ppl"].iloc[0]) if len(dense) else None


def save(fig: plt.Figure, name: str, figures_dir: str | Path, formats: Iterable[str] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``<figures_dir>/<name>.<fmt>`` for each format; returns the paths."""
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"{name}.{fmt}" for fmt in formats]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", metadata={"Date": None} if p.suffix == ".svg" else None)
    return paths


def _baseline(ax, ppl: float | None, label: str = "dense fp32") -> None:
    if ppl is not None:
        ax.axhline(ppl, color="k", ls="--", lw=1, label=f"{label} ({ppl:.2f})")


def _mark_aliases(ax, df: pd.DataFrame, x: str) -> None:
    a = df[df["aliases_source_grid"]]
    if len(a):
        ax.scatter(a[x], a["ppl"], s=110, facecolors="none", edgecolors="crimson", lw=1.3, zorder=5,
                   label=SOURCE_GRID_NOTE)


def _title(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    return (f"{r.get('model', '')}: evaluated on {r.get('evaluation_text', '')}, {int(r.get('eval_tokens', 0))} tokens"
            f" — {r.get('device', '')}")


def quant_figure(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against bits per weight (scales and zeros included), one line per method x group size."""
    fig, ax = plt.subplots(figsize=(6.2, 4))
    q = df[df["method"] != "dense"].copy()
    q["group_size"] = q["group_size"].astype(int)
    for (method, g), sub in q.groupby(["method", "group_size"]):
        sub = sub.sort_values("bits_per_weight")
        ax.plot(sub["bits_per_weight"], sub["ppl"], marker="o" if method == "gptq" else "s",
                ls="-" if method == "gptq" else ":", label=f"{method.upper()} g{g if g > 0 else '=K (per-channel)'}")
    _mark_aliases(ax, q, "bits_per_weight")
    _baseline(ax, dense_ppl(df))
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + scales + zeros)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(_title(df), fontsize=8)
    _legend(ax, loc="upper right", ncol=2)
    return fig


def modern_figure(df: pd.DataFrame) -> plt.Figure:
    """The ``modern`` sweep. Left: perplexity (with its 95% interval where the row has one) against the
    effective bits per weight (codes plus fp16 scales and zeros: what a point stores), one line per method x
    group size (RTN, HQQ, AWQ, GPTQ, rotations, each alone or then GPTQ, on the same asymmetric grid) and
    one per mixed-precision variant (its points are budgets). Right: what each method's compression cost in
    seconds on this machine (HQQ needs no data; AWQ, GPTQ and the mixed allocation's Fisher run on the
    calibration windows)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    q = df[df["method"] != "dense"].copy()
    gptq = q.get("gptq", pd.Series("", index=q.index)).astype(str).str.lower() == "true"
    q["_name"] = [m + ("+gptq" if g and m != "gptq" else "") for m, g in zip(q["method"], gptq)]
    groups = pd.to_numeric(q.get("group_size", pd.Series("", index=q.index)), errors="coerce")
    q["_g"] = ["" if pd.isna(g) else f" g{int(g)}" for g in groups]
    q["_x"] = pd.to_numeric(q["bits_per_weight"])
    styles = {"rtn": ("s", ":"), "hqq": ("D", "-"), "awq": ("^", "-"), "gptq": ("o", "--"), "awq+gptq": ("v", "-."),
              "quarot": ("P", "-"), "quarot+gptq": ("X", "-."), "mixed": ("*", "-"), "mixed+gptq": ("*", "--")}
    for (name, g), sub in q.groupby(["_name", "_g"]):
        sub = sub.sort_values("_x")
        marker, ls = styles.get(name, ("o", "-"))
        line, = a.plot(sub["_x"], sub["ppl"], marker=marker, ls=ls, label=f"{name.upper()}{g}",
                       ms=9 if marker == "*" else None)
        if "ppl_lo" in sub and "ppl_hi" in sub:
            lo, hi = pd.to_numeric(sub["ppl_lo"], errors="coerce"), pd.to_numeric(sub["ppl_hi"], errors="coerce")
            ok = lo.notna() & hi.notna()
            if ok.any():
                y = pd.to_numeric(sub["ppl"])[ok]
                a.errorbar(sub["_x"][ok], y, yerr=[(y - lo[ok]).clip(lower=0), (hi[ok] - y).clip(lower=0)],
                           fmt="none", ecolor=line.get_color(), elinewidth=0.8, alpha=0.6)
    _baseline(a, dense_ppl(df))
    a.set_yscale("log")
    a.set_xlabel("effective bits per weight (codes + fp16 scales and zeros)")
    a.set_ylabel("perplexity (log scale; bars: 95% bootstrap interval)")
    a.set_title(_title(df), fontsize=8)
    _legend(a, loc="upper right", ncol=2, fontsize=7)
    cost = q.groupby("_name")["compress_seconds"].median().sort_values()
    b.barh(cost.index.str.upper(), cost.values, color="tab:blue", alpha=0.7)
    b.set_xscale("log")
    b.set_xlabel("compression seconds (median over the sweep's points; log scale)")
    b.set_title(f"what each method costs to run — {df['device'].iloc[0]}", fontsize=8)
    fig.tight_layout()
    return fig


def allocation_figure(df: pd.DataFrame) -> plt.Figure | None:
    """The mixed-precision points' per-layer allocations (the ``allocation`` column): one panel per point,
    block on x, layer (q, k, v, o, gate, up, down) on y, colour = bits of the codes, a dot where the
    layer has the smaller groups. ``None`` when no row has an allocation."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from experiments.methods.families.mixed import parse_allocation
    rows = df[df.get("allocation", pd.Series("", index=df.index)).fillna("").astype(str) != ""]
    if rows.empty:
        return None
    rows = rows.assign(_x=pd.to_numeric(rows["bits_per_weight"])).sort_values(["_x", "point"])
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.15 + 1.05 * len(rows)), squeeze=False)
    levels = [1, 2, 3, 4, 5, 6, 8]
    cmap = ListedColormap(["#08306b", "#d62728", "#ff7f0e", "#2ca02c", "#17becf", "#9467bd", "#7f7f7f"][:len(levels)])
    norm = BoundaryNorm([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 7, 8.5], cmap.N)
    im = None
    for ax, (_, r) in zip(axes[:, 0], rows.iterrows()):
        alloc = parse_allocation(r["allocation"])
        layers = list(dict.fromkeys(l for _, l, _, _ in alloc))
        n_blocks = max(b for b, *_ in alloc) + 1
        grid = np.full((len(layers), n_blocks), np.nan)
        groups = {}
        for b, l, bits, g in alloc:
            grid[layers.index(l), b] = bits
            groups[(layers.index(l), b)] = g
        im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        small = min(groups.values(), key=lambda g: g if g > 0 else 10**9)
        for (y, x), g in groups.items():
            if g == small and len(set(groups.values())) > 1:
                ax.plot(x, y, ".", color="white", ms=3)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xticks(range(0, n_blocks, max(1, n_blocks // 15)))
        ax.set_title(f"{r['point']}: {r['_x']:.3f} bits per weight, perplexity {float(r['ppl']):.4g}"
                     f" (dot: groups of {small})", fontsize=8)
    for ax in axes[:-1, 0]:
        ax.tick_params(labelbottom=False)   # one block axis, at the bottom: the titles stay readable
    axes[-1, 0].set_xlabel("block")
    fig.colorbar(im, ax=axes[:, 0].tolist(), ticks=levels, label="bits of the codes", fraction=0.02, pad=0.01)
    return fig


def prune_scope(df: pd.DataFrame) -> pd.Series:
    """Per row: "layer" or "row" (magnitude/wanda unstructured comparison group), "" where it does not apply.

    Tables written before the ``scope`` column existed lack it; their magnitude/wanda unstructured
    rows compared weights within each output row (``experiments.methods.compress``), so they read as "row".
    """
    scope = df["scope"].fillna("").astype(str) if "scope" in df else pd.Series("", index=df.index)
    applies = df["method"].isin(["magnitude", "wanda"]) & (df["pattern"].astype(str) == "unstructured")
    return scope.where(~applies | (scope != ""), "row").where(applies, "")


def spec_damp(df: pd.DataFrame) -> pd.Series:
    """Per row: the damping of a damped method (from the ``damp`` column, else from the spec JSON)."""
    import json

    def one(r):
        if "damp" in r and pd.notna(r["damp"]) and str(r["damp"]) != "":
            return str(r["damp"])
        d = json.loads(r["spec"]).get("damp") if isinstance(r.get("spec"), str) else None
        return "" if d is None else str(d)
    return df.apply(one, axis=1) if len(df) else pd.Series(dtype=str)


_SCOPE_NAMES = {"layer": "one threshold per layer", "row": "per output row"}


def sparsity_figure(df: pd.DataFrame) -> plt.Figure:
    """Left: unstructured sparsity sweep per method (and magnitude/wanda comparison scope). Right:
    structured patterns (N:M, blocks) per method."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    s = df[df["method"] != "dense"].copy()
    uns = s[s["pattern"] == "unstructured"].assign(_scope=lambda d: prune_scope(d))
    if not len(uns):
        a.text(0.5, 0.5, "no unstructured points in this table", transform=a.transAxes, ha="center", va="center")
    for (method, scope), sub in uns.groupby(["method", "_scope"]):
        sub = sub.sort_values("sparsity")
        label = f"{method} ({_SCOPE_NAMES[scope]})" if scope else method
        a.plot(100 * sub["sparsity"], sub["ppl"], marker="o", ls="-" if scope != "row" or method != "magnitude"
               else "--", label=label)
    _baseline(a, dense_ppl(df))
    a.set_yscale("log")
    a.set_xlabel("unstructured sparsity (% of weights zero)")
    a.set_ylabel("perplexity (log scale)")
    _legend(a)
    st = s[s["pattern"] != "unstructured"]
    if len(st):
        pats = list(dict.fromkeys(st["pattern"]))
        methods = list(dict.fromkeys(st["method"]))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = [st[(st["pattern"] == p) & (st["method"] == m)]["ppl"].min() for p in pats]
            b.bar([j + i * w for j in range(len(pats))], vals, width=w, label=m)
        b.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(pats))], pats)
        _baseline(b, dense_ppl(df))
        b.set_yscale("log")
        b.set_xlabel("structured pattern")
        _legend(b)
    fig.suptitle(_title(df), fontsize=8)
    return fig


def structured_figure(df: pd.DataFrame) -> plt.Figure:
    """Structured pruning. Left: perplexity against the fraction of the model's parameters kept, one line
    per structure x criterion (blocks removed for layers). Right: perplexity against the measured decode
    speedup over the dense model (both timed back to back in the same run, ``decode_speedup``)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    s = df[df["method"] != "dense"].copy()
    if "steps" not in s:
        s["steps"] = ""
    s["_quant"] = s["quant_method"].fillna("").astype(str) if "quant_method" in s else ""
    markers = {"magnitude": "o", "wanda": "s", "flap": "^", "taylor": "D", "magnitude-sp": "P", "wanda-sp": "X",
               "bi": "v", "last": "x"}
    styles = {"channels": "-", "heads": "--", "channels_heads": "-.", "layers": ":"}
    # FLAP channels run with both scopes: one line each
    s["_scope"] = s["scope"].fillna("").astype(str) if "scope" in s else ""
    for (method, crit, quant, scope), sub in s.groupby(["method", "criterion", "_quant", "_scope"]):
        sub = sub.sort_values("params_kept")
        label = (f"{method} / {crit}" + (f" ({scope})" if scope not in ("", "uniform") else "")
                 + (f" + {quant} w{int(sub['bits'].iloc[0])}" if quant else ""))
        kw = dict(marker=markers.get(crit, "o"), ls=styles.get(method, "-") if not quant else "none", label=label)
        a.plot(100 * sub["params_kept"].astype(float), sub["ppl"], **kw)
        if "decode_speedup" in sub:
            sp = pd.to_numeric(sub["decode_speedup"], errors="coerce")
            b.plot(sp[sp.notna()], sub["ppl"][sp.notna()], marker=kw["marker"], ls="none", label=label)
    for ax in (a, b):
        _baseline(ax, dense_ppl(df))
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    a.set_xlabel("parameters kept (% of dense, embeddings included)")
    b.axvline(1.0, color="grey", lw=0.8)
    dt = sorted(set(s["decode_dtype"].dropna().astype(str))) if "decode_dtype" in s else []
    b.set_xlabel(f"decode speedup vs dense (greedy, {'/'.join(dt) or 'fp32'}, timed interleaved)")
    _legend(a, fontsize=6, ncol=2)
    fig.suptitle(_title(df), fontsize=8)
    return fig


def lowrank_figure(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against the fraction of parameters kept, plain vs activation-aware (whitened) SVD."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lr = df[df["method"] != "dense"].copy()
    lr["_damp"] = spec_damp(lr)
    names = {"svd": "SVD", "whitened_svd": "activation-aware SVD"}
    for (method, damp), sub in lr.groupby(["method", "_damp"]):
        sub = sub.sort_values("ratio")
        ax.plot(sub["ratio"], sub["ppl"], marker="o",
                label=names.get(method, method) + (f" (damp {float(damp):g})" if damp else ""))
    _baseline(ax, dense_ppl(df))
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (fraction of dense)")
    ax.set_ylabel("perplexity (log scale)")
    ax.invert_xaxis()
    ax.set_title(_title(df), fontsize=8)
    _legend(ax)
    return fig


UNIFORM_METHODS = ("rtn", "gptq")


def _flag(col: pd.Series) -> pd.Series:
    """A true/false column as read back from CSV (bools, "True"/"False" strings, or empty)."""
    return col.astype(str).str.lower() == "true"


def _codebook_variant(df: pd.DataFrame) -> pd.Series:
    """Per row: the label part of a non-default zero level or sensitivity (``-nozero``, ``-zero``,
    ``-diagh``; :func:`experiments.methods.families.codebook.variant_suffix`), ``""`` otherwise and in
    tables written before those columns existed."""
    from experiments.methods.families.codebook import DEFAULT_SENSITIVITY, DEFAULT_ZERO_LEVEL

    def one(row) -> str:
        out = ""
        default = DEFAULT_ZERO_LEVEL.get(row["method"])
        zero = str(row.get("zero_level", "")).lower()          # bools, or "True"/"False" read back from CSV
        if default is not None and zero in ("true", "false") and (zero == "true") != default:
            out += "-zero" if zero == "true" else "-nozero"
        sens = row.get("sensitivity", "")
        if isinstance(sens, str) and sens not in ("", DEFAULT_SENSITIVITY):
            out += "-" + sens.replace("_", "")
        return out
    return df.apply(one, axis=1).astype(object) if len(df) else pd.Series("", index=df.index, dtype=object)


def nonuniform_series(df: pd.DataFrame) -> pd.Series:
    """Per row of the nonuniform sweep: the line it belongs to, e.g. ``"squeezellm+gptq pc"``,
    ``"rtn g64"``, ``"kmeans-nozero g128"`` (GPTQ over a codebook is ``<table>+gptq``; uniform GPTQ
    stays ``gptq``; a non-default zero level or sensitivity is its own line)."""
    gptq = _flag(df["gptq"]) if "gptq" in df else pd.Series(False, index=df.index)
    g = pd.to_numeric(df["group_size"], errors="coerce").fillna(-1).astype(int)
    method = df["method"] + _codebook_variant(df)
    name = method.where(~gptq, method + "+gptq")
    series = name + " " + g.map(lambda v: "pc" if v == -1 else f"g{v}")
    return series.where(df["method"] != "dense", "dense")


def nonuniform_figure(df: pd.DataFrame) -> plt.Figure:
    """Perplexity against bits per weight (codes + tables + scales), uniform grids (grey/black, dashed)
    and non-uniform codebooks (colour, solid) on one plot; one line per method x group size."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    q = df[df["method"] != "dense"].copy()
    q["_series"] = nonuniform_series(q)
    markers = {"pc": "o", "g32": "v", "g64": "s", "g128": "D"}
    uniform_colours = iter(["0.15", "0.45", "0.65", "0.3", "0.55", "0.75"])
    for series, sub in q.groupby("_series", sort=True):
        sub = sub.sort_values("bits_per_weight")
        method, grp = series.split(" ")
        uniform = method in UNIFORM_METHODS
        ax.plot(sub["bits_per_weight"], sub["ppl"], marker=markers.get(grp, "^"), ms=4,
                ls="--" if uniform else "-", lw=1 if uniform else 1.4,
                color=next(uniform_colours) if uniform else None,
                label=f"{method.upper() if uniform else method} {grp}" + (" (uniform)" if uniform else ""))
    _mark_aliases(ax, q, "bits_per_weight")
    _baseline(ax, dense_ppl(df))
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + tables + scales)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(_title(df), fontsize=8)
    _legend(ax, loc="upper right", ncol=2)
    return fig


def levels_figure(w: "torch.Tensor", levels: dict, title: str = "") -> plt.Figure:
    """Histogram of one weight row ``w`` with each grid's levels drawn over it as vertical lines
    (``levels``: name -> 1-D tensor of the levels that row can take)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    v = w.detach().float().reshape(-1).numpy()
    ax.hist(v, bins=120, color="0.8", edgecolor="none", label=f"weights ({len(v)})")
    top = ax.get_ylim()[1]
    styles = [("0.2", "--"), ("tab:red", "-"), ("tab:blue", ":"), ("tab:green", "-."), ("tab:purple", "-")]
    for i, (name, lv) in enumerate(levels.items()):
        colour, ls = styles[i % len(styles)]
        lv = sorted(set(float(x) for x in lv))
        h = top * (0.95 - 0.08 * i)
        ax.vlines(lv, 0, h, colors=colour, linestyles=ls, lw=1.1, label=f"{name} ({len(lv)} levels)")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=8)
    _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return fig


def model_layer_speedup(lat: pd.DataFrame, M: int = 1, versus: str = "fp32") -> pd.DataFrame:
    """Per machine and spec: summed latency over the model's own layer shapes at ``M`` against dense
    measured on the same machine. Rows of different machines (``MEASURE_CONTEXT``) are never summed
    together: each machine gets its own rows, labelled by ``latency_device``."""
    ok = lat[(lat["status"] == "ok") & (lat["M"] == M) & (~lat["layer"].astype(str).str.startswith("std_"))]
    ctx = [c for c in MEASURE_CONTEXT if c in ok.columns]
    rows = []
    for key, on_machine in ok.groupby(ctx, sort=False, dropna=False) if ctx else [((), ok)]:
        dense_rows = on_machine[on_machine["spec"] == f'{{"dtype": "{versus}", "method": "dense"}}']
        if dense_rows["layer"].duplicated().any():
            raise ContextMismatch(f"latency rows of one machine ({dict(zip(ctx, key))}) hold two dense {versus} "
                                  f"timings of one layer at M={M}; refusing to pick one")
        dense = dense_rows.groupby("layer")["median_ms"].first()
        comp = on_machine[on_machine["method"] != "dense"]
        for spec, sub in comp.groupby("spec"):
            sub = sub[sub["layer"].isin(dense.index)]
            if sub["layer"].duplicated().any():
                raise ContextMismatch(f"latency rows of one machine hold two timings of {spec} on one layer")
            if len(sub):
                rows.append({"spec": spec, "backend": ",".join(sorted(set(sub["backend"].astype(str)))),
                             "latency_device": sub["device"].iloc[0], "ms": sub["median_ms"].sum(),
                             "dense_ms": dense[sub["layer"]].sum(),
                             "speedup": dense[sub["layer"]].sum() / sub["median_ms"].sum()})
    return pd.DataFrame(rows, columns=["spec", "backend", "latency_device", "ms", "dense_ms", "speedup"])


def _pareto(points: pd.DataFrame, x: str, y: str, lower_x_better: bool = True) -> pd.DataFrame:
    pts = points.sort_values(x, ascending=lower_x_better)
    front, best = [], float("inf")
    for _, r in pts.iterrows():
        if r[y] < best:
            front.append(r)
            best = r[y]
    return pd.DataFrame(front)


def _points_with_intervals(ax, sub: pd.DataFrame, x: str, label: str) -> None:
    """Scatter ``sub``'s perplexities against column ``x``; where a row has its 95% interval
    (``ppl_lo``/``ppl_hi``; rows older than the columns have none) a vertical bar of the same colour."""
    dots = ax.scatter(sub[x], sub["ppl"], s=18, label=label, alpha=0.8)
    if "ppl_lo" not in sub or "ppl_hi" not in sub:
        return
    lo, hi = pd.to_numeric(sub["ppl_lo"], errors="coerce"), pd.to_numeric(sub["ppl_hi"], errors="coerce")
    ok = lo.notna() & hi.notna()
    if ok.any():
        y = pd.to_numeric(sub["ppl"], errors="coerce")[ok]
        ax.errorbar(sub[x][ok], y, yerr=[(y - lo[ok]).clip(lower=0), (hi[ok] - y).clip(lower=0)], fmt="none",
                    ecolor=dots.get_facecolor()[0], elinewidth=0.8, alpha=0.6)


def claims_figure(table: pd.DataFrame):
    """Forest plot of :func:`experiments.analysis.claims.claims_table`: each claim's paired ΔNLL per token
    (better - worse) with its 95% interval, on the main text (and the second text where paired); left
    of 0 the claim holds, an interval across 0 is within noise. Claims that cannot be paired are left out."""
    t = table[table["verdict"] != "not paired"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(10, 0.32 * max(len(t), 3) + 1.4))
    if not len(t):
        ax.text(0.5, 0.5, "no claim has both rows with per-window NLL", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    y = range(len(t))[::-1]
    colours = {"holds": "tab:green", "within noise": "tab:gray", "reversed": "tab:red"}
    for yi, (_, r) in zip(y, t.iterrows()):
        ax.errorbar([r["dnll"]], [yi], xerr=[[r["dnll"] - r["dnll_lo"]], [r["dnll_hi"] - r["dnll"]]], fmt="o",
                    color=colours.get(r["verdict"], "k"), ms=4, capsize=2)
        if r["verdict2"] != "not paired" and pd.notna(r["dnll2"]):
            ax.errorbar([r["dnll2"]], [yi - 0.25], xerr=[[r["dnll2"] - r["dnll2_lo"]], [r["dnll2_hi"] - r["dnll2"]]],
                        fmt="s", color=colours.get(r["verdict2"], "k"), ms=3, capsize=1.5, alpha=0.5)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_yticks(list(y), [f"{r['claim']} ({r['sweep']})" for _, r in t.iterrows()], fontsize=7)
    ax.set_xlabel("ΔNLL per token, better − worse (95% paired bootstrap over windows; symlog); "
                  "circles: main text, squares: second text", fontsize=7)
    ax.set_title("green: holds, grey: within noise, red: reversed", fontsize=8)
    fig.tight_layout()
    return fig


def pareto_figure(tables: dict[str, pd.DataFrame], latency: pd.DataFrame | None = None,
                  decode: pd.DataFrame | None = None, decode_dtype: str = "bf16") -> plt.Figure:
    """All methods on one accuracy-memory(-speed) frontier, combinations included.

    Speed panel: with ``decode`` (a ``latency --decode`` table), the measured end-to-end decode
    speedup of each point's storage format in ``decode_dtype`` over the fastest dense dtype of the same
    decode run (over dense in ``decode_dtype`` for rows older than that column; the axis names the
    baselines: :func:`with_decode_speedup`) (what a format buys when the whole model's weights stream
    from memory); else, with ``latency``, the summed
    layer latency at the model's own shapes against dense fp32 (single layers whose weights stay in
    the CPU's cache between timings: a format's fixed per-call cost dominates there).

    The sweep tables must share one context apart from their settings (one model, corpus and machine),
    and ``latency``/``decode`` must each come from one machine: otherwise ``ContextMismatch``, never a
    merged figure.
    """
    frames = [t.assign(sweep=name) for name, t in tables.items() if t is not None and len(t)]
    check_single_context(pd.concat(frames, ignore_index=True).to_dict("records"),
                         ("model", "corpus", "evaluation_text", "device"), "the sweep tables of the Pareto figure")
    if latency is not None and len(latency):
        check_single_context(latency.to_dict("records"), MEASURE_CONTEXT, "the latency table of the Pareto figure")
    df = pd.concat(frames, ignore_index=True)
    comp = df[df["method"] != "dense"]
    use_decode = decode is not None and len(decode) > 0
    ncols = 2 if use_decode or (latency is not None and len(latency)) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    for sweep, sub in comp.groupby("sweep"):
        _points_with_intervals(ax, sub, "bits_per_weight", sweep)
    front = _pareto(comp, "bits_per_weight", "ppl")
    ax.plot(front["bits_per_weight"], front["ppl"], "k-", lw=0.8, label="Pareto frontier")
    _mark_aliases(ax, comp, "bits_per_weight")
    _baseline(ax, dense_ppl(df), "dense (sizes counted as fp16: 16 bits/weight)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective bits per weight (log2; fp16 = 16)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("accuracy vs memory", fontsize=9)
    _legend(ax, loc="upper right")
    if ncols == 2 and use_decode:
        ax = axes[0, 1]
        joined, dev = with_decode_speedup(comp, decode, decode_dtype)
        joined = joined[joined["speedup"].notna()]
        for sweep, sub in joined.groupby("sweep"):
            _points_with_intervals(ax, sub, "speedup", sweep)
        if len(joined):
            front = _pareto(joined, "speedup", "ppl", lower_x_better=False)
            ax.plot(front["speedup"], front["ppl"], "k-", lw=0.8, label="Pareto frontier")
        other = joined[joined["sweep"] != "structured"]
        ax.axvline(1.0, color="k", ls=":", lw=1, label=f"{baselines_text(other) or 'dense'} speed")
        _baseline(ax, dense_ppl(df))
        ax.set_yscale("log")
        own = baselines_text(joined[joined["sweep"] == "structured"])
        ax.set_xlabel(f"measured greedy-decode speedup of each storage format in {decode_dtype} over "
                      f"{baselines_text(other) or 'dense'}" + (f"; structured: own, over {own}" if own else ""),
                      fontsize=8)
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"accuracy vs decode speed — measured on {dev}", fontsize=8)
        _legend(ax, loc="upper right")
    elif ncols == 2:
        ax = axes[0, 1]
        sp = model_layer_speedup(latency)
        joined = comp.merge(sp, on="spec", how="inner")
        for sweep, sub in joined.groupby("sweep"):
            _points_with_intervals(ax, sub, "speedup", sweep)
        if len(joined):
            front = _pareto(joined, "speedup", "ppl", lower_x_better=False)
            ax.plot(front["speedup"], front["ppl"], "k-", lw=0.8, label="Pareto frontier")
        ax.axvline(1.0, color="k", ls=":", lw=1, label="dense fp32 speed")
        _baseline(ax, dense_ppl(df))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        dev = joined["latency_device"].iloc[0] if len(joined) else ""
        ax.set_xlabel("speedup over dense fp32, model's layers summed, M=1 (CPU backends; log2)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"accuracy vs latency — measured on {dev}", fontsize=8)
        _legend(ax, loc="upper right")
    return fig


def family_of_row(sweep: str, row: pd.Series) -> str:
    """The comparison group a sweep row belongs to in :func:`families_figure`."""
    method = str(row.get("method", ""))
    if sweep == "structured":
        return "structured (channels/heads/blocks)"
    if sweep == "lowrank":
        return "low rank"
    if sweep == "combo":
        return "prune + quantize"
    if sweep == "sparsity":
        pattern = str(row.get("pattern") or "")
        if pattern.startswith("block"):
            return "block sparsity"
        return "N:M sparsity" if ":" in pattern else "unstructured sparsity"
    if sweep in ("quant", "nonuniform"):
        return "uniform quantization" if method in UNIFORM_METHODS else "codebook quantization"
    return sweep


def _format_key(spec_json: str) -> str:
    """The canonical storage-format key of a row's ``spec`` (JSON), as the decode tables name it."""
    import json

    from experiments.measure.formats import canonical, format_of
    return canonical(format_of(json.loads(spec_json)))


def decode_baseline(row) -> tuple[float, str]:
    """(speedup, what it is over) of one decode-table row: ``speedup_vs_fastest_dense`` where the row has
    it (the fastest dense dtype measured in the same run, ``decode_speed.fastest_dense``), else the older
    ``speedup_vs_dense`` (over dense in the row's own dtype); (NaN, "") with neither."""
    fastest = pd.to_numeric(pd.Series([row.get("speedup_vs_fastest_dense")]), errors="coerce").iloc[0]
    if pd.notna(fastest):
        return float(fastest), f"fastest dense ({row.get('fastest_dense_dtype')})"
    same = pd.to_numeric(pd.Series([row.get("speedup_vs_dense")]), errors="coerce").iloc[0]
    return (float(same), f"dense {row.get('dtype')}") if pd.notna(same) else (float("nan"), "")


def decode_speedup_by_format(decode: pd.DataFrame) -> pd.DataFrame:
    """One row per (storage format, dtype) of a decode table (``decode_speed.run_decode``): its measured
    eager decode speedup (:func:`decode_baseline`: over the fastest dense dtype of the same run where the
    table has that column, else over dense in the same dtype) and that baseline (``decode_baseline``).
    Compiled rows are left out (their dense baseline is the compiled dense model); a table of several
    machines is refused."""
    check_single_context(decode.to_dict("records"), MEASURE_CONTEXT, "the decode table")
    d = decode[~decode["label"].astype(str).str.endswith(" compiled")]
    rows = []
    dense = _format_key('{"method": "dense"}')
    for _, r in d.iterrows():
        sp, base = decode_baseline(r)
        if pd.notna(sp) and _format_key(r["spec"]) != dense:   # dense rows carry their own vs the fastest
            rows.append({"format": _format_key(r["spec"]), "dtype": r["dtype"], "decode_speedup": sp,
                         "decode_baseline": base, "decode_device": r["device"]})
    return pd.DataFrame(rows, columns=["format", "dtype", "decode_speedup", "decode_baseline",
                                       "decode_device"]).drop_duplicates(["format", "dtype"])


def with_decode_speedup(points: pd.DataFrame, decode: pd.DataFrame | None, dtype: str = "bf16"
                        ) -> tuple[pd.DataFrame, str]:
    """``points`` (sweep rows) with ``speedup`` / ``speedup_dtype`` / ``speedup_baseline``: a row's own
    measured ``decode_speedup`` (structured pruning, in its ``decode_dtype``, over dense in that dtype;
    tables older than that column timed in fp32), else the decode table's speedup of its storage format
    in ``dtype`` (:func:`decode_speedup_by_format`: over the fastest dense dtype of the decode run where
    the table has it), else NaN; and the decode table's machine ("" without one)."""
    out = points.copy()
    own = pd.to_numeric(out["decode_speedup"], errors="coerce") if "decode_speedup" in out else None
    out["speedup"] = own if own is not None else float("nan")
    own_dtype = out["decode_dtype"].fillna("") if "decode_dtype" in out else pd.Series("", index=out.index)
    out["speedup_dtype"] = [(d or "fp32") if pd.notna(v) else "" for v, d in zip(out["speedup"], own_dtype)]
    out["speedup_baseline"] = [f"dense {d}" if d else "" for d in out["speedup_dtype"]]
    if decode is None or not len(decode):
        return out, ""
    import json

    from experiments.methods.spec import family_of as spec_family
    by_fmt = decode_speedup_by_format(decode)
    by_fmt = by_fmt[by_fmt["dtype"] == dtype].set_index("format")
    for i, r in out.iterrows():
        if pd.notna(r["speedup"]) or r.get("sweep") == "structured":
            continue
        spec = json.loads(r["spec"])
        if spec_family(spec["method"]).storage_format(spec) is None:
            continue   # no single per-layer format (mixed precision): no decode row to take
        fmt = _format_key(r["spec"])
        if fmt in by_fmt.index:
            out.at[i, "speedup"] = by_fmt.at[fmt, "decode_speedup"]
            out.at[i, "speedup_dtype"] = dtype
            out.at[i, "speedup_baseline"] = by_fmt.at[fmt, "decode_baseline"]
    return out, (by_fmt["decode_device"].iloc[0] if len(by_fmt) else "")


def baselines_text(points: pd.DataFrame) -> str:
    """The decode baselines of rows that have a speedup (:func:`with_decode_speedup`), for a caption."""
    has = points[points["speedup"].notna()] if len(points) else points
    return ", ".join(sorted(set(has["speedup_baseline"]))) if len(has) else ""


def families_figure(tables: dict[str, pd.DataFrame], decode: pd.DataFrame | None = None,
                    dtype: str = "bf16") -> plt.Figure:
    """What each family buys: every sweep point on two axes, coloured by family.

    Left: perplexity against the size of the compressed transformer-block weights (effective bits per
    weight of the original weight count: quantization and sparsity formats by their storage, structured
    pruning and low rank by the parameters they keep, all at 16-bit floats). Right: perplexity against the
    *measured* end-to-end decode speedup over the dense model: structured points carry their own (timed
    back to back with dense in the sweep, in its dtype); the other families take the decode table's row of
    their storage format in ``dtype`` (``latency --decode``: a format's speed does not depend on the
    algorithm that chose its values), over the fastest dense dtype of that decode run where the table has
    it (:func:`with_decode_speedup`; the legend names each baseline), points without one are left out of
    that panel. Contexts are checked as in
    :func:`pareto_figure`."""
    frames = [t.assign(sweep=name) for name, t in tables.items() if t is not None and len(t)]
    if not frames:
        raise NoResults("families_figure: no sweep table given")
    df = pd.concat(frames, ignore_index=True)
    check_single_context(df.to_dict("records"), ("model", "corpus", "evaluation_text", "device", "quick"),
                         "the sweep tables of the families figure")
    comp = df[df["method"] != "dense"].copy()
    comp["family"] = [family_of_row(r["sweep"], r) for _, r in comp.iterrows()]
    comp, dev = with_decode_speedup(comp, decode, dtype)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (fam, sub) in enumerate(comp.groupby("family")):  # one colour per family on both panels
        c = colours[k % len(colours)]
        a.scatter(sub["bits_per_weight"], sub["ppl"], s=16, alpha=0.8, label=fam, color=c)
        has = sub[sub["speedup"].notna()]
        if len(has):
            b.scatter(has["speedup"], has["ppl"], s=16, alpha=0.8, color=c,
                      label=f"{fam} ({'/'.join(sorted(set(has['speedup_dtype'])))} vs {baselines_text(has)})")
    for ax in (a, b):
        _baseline(ax, dense_ppl(df))
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    a.set_xscale("log", base=2)
    a.set_xlabel("effective bits per weight of the block weights (log2; dense fp16 = 16)")
    a.set_title("accuracy vs size", fontsize=9)
    b.axvline(1.0, color="k", ls=":", lw=1, label="dense speed")
    b.set_xlabel("measured decode speedup over the dense model (the fastest dense dtype of the decode run "
                 "where measured, else the same dtype: see the legend)")
    sdev = comp.loc[comp["sweep"] == "structured", "device"]
    where = ", ".join(sorted({str(x) for x in [dev, *sdev.unique()] if x}))
    b.set_title(f"accuracy vs decode speed — measured on {where or 'no machine'}", fontsize=8)
    _legend(a, fontsize=6)
    _legend(b, fontsize=6)
    fig.suptitle(_title(df), fontsize=8)
    return fig


def latency_figure(lat: pd.DataFrame, layer: str = "std_4096x4096", versus: str = "fp32") -> plt.Figure:
    """Speedup over dense of every format at one shape, grouped by M (from one latency run)."""
    ok = lat[(lat["status"] == "ok") & (lat["layer"] == layer) & (lat["method"] != "dense")].copy()
    ok["format"] = ok["format"] + " [" + ok["backend"].astype(str) + "]"  # which CPU/GPU path actually ran
    col = f"speedup_vs_dense_{versus}"
    fmts = ok.groupby("format")[col].max().sort_values().index.tolist()
    Ms = sorted(ok["M"].unique())
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * len(fmts) + 1)))
    h = 0.8 / max(len(Ms), 1)
    for i, M in enumerate(Ms):
        sub = ok[ok["M"] == M].groupby("format")[col].first()
        ax.barh([j + i * h for j in range(len(fmts))], [sub.get(f, float("nan")) for f in fmts], height=h, label=f"M={M}")
    ax.set_yticks([j + h * (len(Ms) - 1) / 2 for j in range(len(fmts))], fmts)
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    dev = ok["device"].iloc[0] if len(ok) else ""
    kind = "CPU" if (len(ok) and ok["device_type"].iloc[0] == "cpu") else "GPU"
    ax.set_xlabel(f"speedup over dense {versus} ({kind} measurement, log2; >1 is faster)")
    ax.set_title(f"{layer.replace('std_', '')} layer — {dev}", fontsize=8)
    _legend(ax)
    return fig


def roofline_figure(roof: pd.DataFrame, gpu: str = "H100 SXM", N: int = 4096, K: int = 4096,
                    measured: pd.DataFrame | None = None) -> plt.Figure:
    """Ideal (modelled) speedup over dense fp16 against M, per format; measured GPU points if any."""
    sub = roof[(roof["gpu"] == gpu) & (roof["N"] == N) & (roof["K"] == K)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (fmt, s) in enumerate(sub.groupby("format")):
        s = s.sort_values("M")
        # more formats than colours in the cycle: the line style tells the second lap apart
        ax.plot(s["M"], s["ideal_speedup_vs_dense_fp16"], marker=".", ls=("-", "--", ":")[i // 10 % 3], label=fmt)
    if measured is not None and len(measured):
        m = measured[(measured["N"] == N) & (measured["K"] == K) & (measured["method"] != "dense")]
        ax.scatter(m["M"], m["speedup_vs_dense_fp16"], c="k", marker="x", label=f"measured on {gpu} (GPU)")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (tokens per matmul, log2)")
    ax.set_ylabel("ideal speedup over dense fp16 (log2)")
    ax.set_title(f"roofline MODEL (not a measurement): {gpu}, {N}x{K}", fontsize=8)
    _legend(ax, ncol=2)
    return fig


def compile_check_figure(cc: pd.DataFrame) -> plt.Figure:
    """Registers and shared memory of every compiled config, per target, against the target's limits."""
    targets = list(dict.fromkeys(cc["target"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fams = list(dict.fromkeys(cc["kernel"]))
    for ax, col, label in ((axes[0], "registers", "registers per thread"),
                           (axes[1], "shared_bytes", "shared memory per block (KiB)")):
        for j, t in enumerate(targets):
            sub = cc[cc["target"] == t]
            y = sub[col] / (1024 if col == "shared_bytes" else 1)
            x = [fams.index(k) + (j - (len(targets) - 1) / 2) * 0.25 for k in sub["kernel"]]
            ax.scatter(x, y, s=12, label=t, alpha=0.7)
            if col == "shared_bytes":
                ax.axhline(sub["shared_limit"].iloc[0] / 1024, ls="--", lw=0.8, color=f"C{j}")
        ax.set_xticks(range(len(fams)), fams, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(label)
    axes[0].axhline(255, color="k", ls=":", lw=0.8, label="NVIDIA max (255)")
    _legend(axes[0])
    axes[1].set_title("dashed: per-block limit of each target", fontsize=8)
    fig.suptitle("compile check: every autotune config, compiled ahead of time without a GPU (0 spills required)",
                 fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# GPU results (``make gpu-check`` -> results/gpu/*.csv)
# ---------------------------------------------------------------------------------------------
# The columns of a dequant benchmark row (benchmarks/gpu_check.py, ``_dq_row``): what the GPU figures read.
GPU_DEQUANT_COLUMNS = ("shape", "N", "K", "M", "variant", "median_ms", "pct_copy_bw", "device", "git_commit",
                       "timestamp")


def gpu_dir(root: str | Path = RESULTS) -> Path:
    return Path(root) / "gpu"


def gpu_tables(root: str | Path = RESULTS) -> dict[str, pd.DataFrame]:
    """Every ``<root>/gpu/*.csv`` by name, each with ``kernel_revision`` (rows written before the column
    existed measured revision 1: ``triton_kernels.provenance.KERNEL_REVISION``)."""
    out = {}
    for path in sorted(gpu_dir(root).glob("*.csv")):
        df = pd.read_csv(path)
        if "kernel_revision" not in df.columns:
            df["kernel_revision"] = 1
        df["kernel_revision"] = pd.to_numeric(df["kernel_revision"], errors="coerce").fillna(1).astype(int)
        out[path.stem] = df
    return out


def gpu_dequant_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The measured ``dequant_matmul`` / cuBLAS rows of all GPU tables (any table with the dequant columns:
    decode4, sweep, large, gemlite, and the older ``dequant``), one per (device, shape, M, variant): the one of
    the newest kernel revision, then the newest run."""
    frames = [df.assign(table=name) for name, df in tables.items()
              if set(GPU_DEQUANT_COLUMNS) <= set(df.columns) and "speedup_vs_fp16" in df.columns]
    if not frames:
        return pd.DataFrame(columns=[*GPU_DEQUANT_COLUMNS, "kernel_revision", "table"])
    df = pd.concat(frames, ignore_index=True)
    df = df[(df["status"] == "ok") & pd.to_numeric(df["median_ms"], errors="coerce").notna()].copy()
    for c in ("M", "N", "K"):
        df[c] = df[c].astype(int)
    df = df.sort_values(["kernel_revision", "timestamp"])
    return df.drop_duplicates(["device", "shape", "M", "variant"], keep="last").reset_index(drop=True)


def kernels_label(rows: pd.DataFrame) -> str:
    """Which kernels the rows measured, for a title: current, or old (and which revision)."""
    from triton_kernels.provenance import KERNEL_REVISION
    revs = sorted(set(rows["kernel_revision"]))
    commits = ", ".join(dict.fromkeys(str(c)[:7] for c in rows["git_commit"]))
    if revs == [KERNEL_REVISION]:
        return f"current kernels (revision {KERNEL_REVISION}, commit {commits})"
    return (f"OLD kernels (revision {'/'.join(map(str, revs))}, commit {commits}; "
            f"current is revision {KERNEL_REVISION})")


def _bits_colour(bits: int) -> str:
    """One colour per bit width in both GPU figures."""
    return f"C{bits - 1}"


def _uniform_g128(rows: pd.DataFrame) -> pd.DataFrame:
    q = rows[rows["variant"].astype(str).str.fullmatch(r"int\d_g128_asym")].copy()
    q["bits"] = q["variant"].str[3].astype(int)
    return q


def gpu_speedup_figure(rows: pd.DataFrame, shape: str | None = None) -> plt.Figure:
    """Marlin-style: speedup of ``dequant_matmul`` (g128, asym) over cuBLAS fp16 against the batch size M, one
    line per bit width, the ideal 16/bits (weight bytes only) dashed in the same colour. ``shape``: the
    layer (default: the one with the most points, the largest on ties)."""
    q = _uniform_g128(rows)
    if not len(q):
        raise NoResults("no dequant_matmul g128 rows in the GPU tables (make gpu-check: sweep, decode4)")
    if shape is None:
        count = q.groupby("shape").size()
        first = q.groupby("shape")[["N", "K"]].first()
        shape = max(count.index, key=lambda s: (count[s], first.loc[s, "N"] * first.loc[s, "K"]))
    q = q[q["shape"] == shape]
    fig, ax = plt.subplots(figsize=(6, 4))
    for bits, s in sorted(q.groupby("bits"), key=lambda t: t[0]):
        s = s.sort_values("M")
        ax.plot(s["M"], s["speedup_vs_fp16"], marker="o", ms=3, color=_bits_colour(bits), label=f"{bits}-bit g128")
        ax.axhline(16 / bits, color=_bits_colour(bits), ls="--", lw=0.9, label=f"ideal 16/{bits} = {16 / bits:.2g}")
    ax.axhline(1.0, color="k", ls=":", lw=1, label="cuBLAS fp16")
    Ms = sorted(q["M"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(Ms, [str(m) for m in Ms])
    ax.set_xlabel("batch size M (tokens per matmul)")
    ax.set_ylabel("speedup over cuBLAS fp16 (GPU measurement, log2)")
    ax.set_title(f"dequant_matmul {shape}, {q['device'].iloc[0]}\n{kernels_label(q)}", fontsize=8)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def gpu_bandwidth_figure(rows: pd.DataFrame, M: int = 1) -> plt.Figure:
    """Achieved bandwidth (weights + activations + output moved, over the time) as % of the device-to-device
    copy bandwidth measured in the same run, at batch ``M``, per layer shape: cuBLAS fp16 and each bit width."""
    sub = rows[(rows["M"] == M) & pd.to_numeric(rows["pct_copy_bw"], errors="coerce").notna()]
    q = _uniform_g128(sub)
    dense = sub[sub["variant"] == "dense_fp16"].assign(bits=16)
    both = pd.concat([dense, q], ignore_index=True)
    if not len(both):
        raise NoResults(f"no GPU rows at M={M} with a copy bandwidth (make gpu-check: bandwidth, decode4)")
    first = both.groupby("shape")[["N", "K"]].first()
    shapes = sorted(first.index, key=lambda s: -int(first.loc[s, "N"]) * int(first.loc[s, "K"]))
    series = sorted(both["bits"].unique(), reverse=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(shapes) + 2), 3.6))
    h = 0.8 / len(series)
    for i, bits in enumerate(series):
        s = both[both["bits"] == bits].set_index("shape")["pct_copy_bw"].astype(float)
        ax.bar([j + i * h for j in range(len(shapes))], [s.get(x, float("nan")) for x in shapes], width=h,
               label="cuBLAS fp16" if bits == 16 else f"{bits}-bit g128",
               color="0.6" if bits == 16 else _bits_colour(bits))
    ax.axhline(100, color="k", ls="--", lw=1)
    ax.set_xticks([j + h * (len(series) - 1) / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
    ax.set_ylabel(f"% of copy bandwidth at M={M}")
    ax.set_title(f"{both['device'].iloc[0]}: {kernels_label(both)}", fontsize=8)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def draw_gpu_figures(root: str | Path = RESULTS, figures_dir: str | Path | None = None) -> list[Path]:
    """Both GPU figures from ``<root>/gpu/*.csv`` into ``figures_dir`` (default: beside the other figures of
    ``root``, see :func:`figures_dir_for`): ``gpu_speedup_vs_batch`` and ``gpu_bandwidth``."""
    rows = gpu_dequant_rows(gpu_tables(root))
    figures_dir = Path(figures_dir) if figures_dir is not None else figures_dir_for(root, False)
    paths = []
    for name, draw in (("gpu_speedup_vs_batch", gpu_speedup_figure), ("gpu_bandwidth", gpu_bandwidth_figure)):
        fig = draw(rows)
        paths += save(fig, name, figures_dir)
        plt.close(fig)
    return paths


def add_gpu_figures_arguments(p) -> None:
    p.add_argument("--results-dir", default=str(RESULTS), metavar="DIR",
                   help="the results directory whose gpu/*.csv to draw (default: the reference results/)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the figures go (default <results-dir>/figures: results/figures for the reference, "
                        "committed with the GPU tables)")


def gpu_figures_main(args) -> int:
    """``python -m experiments gpu-figures``: both GPU figures; prints the paths written."""
    root = Path(args.results_dir).expanduser().resolve()
    if not gpu_dir(root).is_dir():
        raise NoResults(f"--results-dir {args.results_dir}: no gpu/ directory there (make gpu-check writes it)")
    for path in draw_gpu_figures(root, Path(args.out) if args.out else root / "figures"):
        print(path)
    return 0
