"""How a run's numbers compare with the committed reference results (the diff that ``reproduce`` ends with).

    python -m experiments compare [--quick] [--run NAME | --out-dir DIR]

Per sweep point of the run: the reference and the new perplexity, bits per weight and bytes, and the
relative difference ``new / reference - 1``. Points are matched by sweep and point label, and only
when the spec is the same and the reference table has the same comparable context
(``experiments.core.runs.COMPARABLE_CONTEXT``: model, corpus, settings); the machine may differ, that is
the point of the comparison. Latency and decode speed are compared only as information: another
machine gives other timings.

What to expect (docs/reproduce.md, "What to expect on another machine"): on the machine that produced the reference, every
number is identical; on another CPU the uncalibrated points (RTN, magnitude, plain SVD) come out
identical or nearly so, calibrated points (GPTQ, Wanda, SparseGPT, activation-aware SVD) differ by a few
percent (0.5-3.4% seen between an AMD EPYC and an Intel Xeon), and sizes are always identical.

The table is printed as Markdown and written to ``<run>[/quick]/compare_reference.csv``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from experiments.core import results
from experiments.core.runs import (COMPARABLE_CONTEXT, MEASURE_CONTEXT, SWEEP_CONTEXT, SWEEP_CONTEXT_ADDED, mode_dir,
                                   reference_dir, run_root)

SWEEP_METRICS = (("ppl", "accuracy"), ("bits_per_weight", "size"), ("bytes", "size"))
OUT_NAME = "compare_reference.csv"


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rel(new: float | None, ref: float | None) -> float | None:
    if new is None or ref is None:
        return None
    if ref == 0:
        return 0.0 if new == 0 else math.inf
    return new / ref - 1


def _canon(spec: str) -> str:
    try:
        return json.dumps(json.loads(spec), sort_keys=True)
    except (TypeError, ValueError):
        return str(spec)


def compare_sweeps(run_dir: Path, ref_dir: Path) -> list[dict]:
    """One row per (point, metric) of every ``sweep_*.csv`` in ``run_dir`` against ``ref_dir``."""
    out: list[dict] = []
    for path in sorted(run_dir.glob("sweep_*.csv")):
        sweep = path.stem[len("sweep_"):]
        run = results.read_rows(path)
        if not run:
            continue
        run_ctx = results.check_single_context(run, SWEEP_CONTEXT, str(path), added=SWEEP_CONTEXT_ADDED)
        ref_path = ref_dir / path.name
        ref = results.read_rows(ref_path)
        base = {"sweep": sweep, "run_device": run_ctx.get("device", "")}
        if not ref:
            out += [{**base, "point": r["point"], "status": f"no reference table {ref_path}"} for r in run]
            continue
        ref_ctx = results.check_single_context(ref, SWEEP_CONTEXT, str(ref_path), added=SWEEP_CONTEXT_ADDED)
        base["reference_device"] = ref_ctx.get("device", "")
        differ = [c for c in COMPARABLE_CONTEXT if c in run_ctx and c in ref_ctx and run_ctx[c] != ref_ctx[c]]
        if differ:
            why = "; ".join(f"{c}: reference {ref_ctx[c]!r}, run {run_ctx[c]!r}" for c in differ)
            out += [{**base, "point": r["point"], "status": f"not comparable, reference is another context ({why})"}
                    for r in run]
            continue
        ref_by_point = {r["point"]: r for r in ref}
        for r in run:
            calibrated = (_float(r.get("calib_samples")) or 0) > 0
            row0 = {**base, "point": r["point"], "calibrated": calibrated}
            rr = ref_by_point.get(r["point"])
            if rr is None:
                out.append({**row0, "status": "not in the reference"})
                continue
            if _canon(rr.get("spec", "")) != _canon(r.get("spec", "")):
                out.append({**row0, "status": f"not comparable: reference spec {rr.get('spec')} != run spec {r.get('spec')}"})
                continue
            for metric, kind in SWEEP_METRICS:
                ref_v, new_v = _float(rr.get(metric)), _float(r.get(metric))
                rel = _rel(new_v, ref_v)
                out.append({**row0, "metric": metric, "kind": kind, "reference": ref_v, "new": new_v,
                            "rel_diff": rel, "status": "identical" if rel == 0 else "differs"})
        done = {r["point"] for r in run}
        out += [{**base, "point": p, "status": "in the reference, not in this run"} for p in ref_by_point if p not in done]
    return out


def compare_measurements(run_dir: Path, ref_dir: Path) -> list[dict]:
    """Latency (median ms) and decode (tokens/s) of the run against the reference: information only."""
    out: list[dict] = []
    tables = (("latency_", ("layer", "N", "K", "M", "spec"), "median_ms", "latency (info: machines differ)"),
              ("decode_", ("label", "new_tokens"), "tokens_per_s", "decode (info: machines differ)"))
    for prefix, key, metric, kind in tables:
        for path in sorted(run_dir.glob(f"{prefix}*.csv")):
            ref_path = ref_dir / path.name
            run, ref = results.read_rows(path), results.read_rows(ref_path)
            if not run or not ref:
                continue
            run_ctx = results.check_single_context(run, MEASURE_CONTEXT, str(path))
            ref_ctx = results.check_single_context(ref, MEASURE_CONTEXT, str(ref_path))
            ref_by = {tuple(r.get(k, "") for k in key): r for r in ref if r.get("status", "ok") == "ok"}
            for r in run:
                rr = ref_by.get(tuple(r.get(k, "") for k in key))
                if rr is None or r.get("status", "ok") != "ok":
                    continue
                ref_v, new_v = _float(rr.get(metric)), _float(r.get(metric))
                out.append({"sweep": path.stem, "point": " ".join(str(r.get(k, "")) for k in key if k != "spec")
                            + (f" {r.get('format', '')}" if "format" in r else ""),
                            "metric": metric, "kind": kind, "reference": ref_v, "new": new_v,
                            "rel_diff": _rel(new_v, ref_v), "status": "info",
                            "reference_device": ref_ctx.get("device", ""), "run_device": run_ctx.get("device", "")})
    return out


def _pct(v) -> str:
    return "" if v is None else ("inf" if math.isinf(v) else f"{100 * v:+.2f}%")


def _g(v) -> str:
    return "" if v is None else f"{v:.6g}"


def render(rows: list[dict]) -> str:
    """Markdown: one line per sweep point, then a summary of the differences and of the timings."""
    lines = ["| sweep | point | calibrated | ppl reference | ppl new | ppl diff | bits/w ref | bits/w new | bytes diff | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_point: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind", "accuracy") in ("accuracy", "size") or "metric" not in r:
            by_point.setdefault((r["sweep"], r["point"]), {"status": set(), "calibrated": r.get("calibrated")})
            d = by_point[(r["sweep"], r["point"])]
            d["status"].add(r["status"])
            if "metric" in r:
                d[r["metric"]] = r
    for (sweep, point), d in by_point.items():
        ppl, bpw, nbytes = d.get("ppl", {}), d.get("bits_per_weight", {}), d.get("bytes", {})
        status = "; ".join(sorted(d["status"]))
        cal = "" if d["calibrated"] is None else ("yes" if d["calibrated"] else "no")
        lines.append(f"| {sweep} | {point} | {cal} | {_g(ppl.get('reference'))} | {_g(ppl.get('new'))} "
                     f"| {_pct(ppl.get('rel_diff'))} | {_g(bpw.get('reference'))} | {_g(bpw.get('new'))} "
                     f"| {_pct(nbytes.get('rel_diff'))} | {status} |")
    notes = []
    for cal, name in ((False, "uncalibrated"), (True, "calibrated")):
        diffs = [abs(r["rel_diff"]) for r in rows if r.get("metric") == "ppl" and r.get("calibrated") == cal
                 and r.get("rel_diff") is not None]
        if diffs:
            notes.append(f"{name} points: {len(diffs)} compared, {sum(d == 0 for d in diffs)} identical, "
                         f"largest perplexity difference {100 * max(diffs):.2f}%")
    sizes = [r for r in rows if r.get("kind") == "size" and r.get("rel_diff") is not None]
    if sizes:
        bad = [r for r in sizes if r["rel_diff"] != 0]
        notes.append("sizes: all identical" if not bad else
                     f"sizes: {len(bad)} of {len(sizes)} differ (unexpected: storage does not depend on the machine)")
    missing = [k for k, d in by_point.items() if not any(m in d for m in ("ppl",))]
    if missing:
        notes.append(f"{len(missing)} point(s) not compared (see status)")
    for kind in ("latency (info: machines differ)", "decode (info: machines differ)"):
        sub = [r for r in rows if r.get("kind") == kind and r.get("new") and r.get("reference")]
        if sub:
            ratios = [r["new"] / r["reference"] for r in sub]
            notes.append(f"{kind.split(' ')[0]} (information only; reference on {sub[0]['reference_device']}, this run on "
                         f"{sub[0]['run_device']}): {len(sub)} matched {sub[0]['metric']} values, new/reference "
                         f"median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}x-{max(ratios):.2f}x")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def compare(run_dir: str | Path, ref_dir: str | Path, out: str | Path | None = None) -> tuple[list[dict], str]:
    """Compare ``run_dir`` (one mode: a run root or its ``quick/``) with ``ref_dir``; write ``out``."""
    run_dir, ref_dir = Path(run_dir), Path(ref_dir)
    rows = compare_sweeps(run_dir, ref_dir) + compare_measurements(run_dir, ref_dir)
    if out is not None and rows:
        cols = ("sweep", "point", "calibrated", "metric", "kind", "reference", "new", "rel_diff", "status",
                "reference_device", "run_device")
        results.write_rows(out, [{c: ("" if r.get(c) is None else r.get(c, "")) for c in cols} for r in rows])
    return rows, render(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="compare the quick-mode tables")
    p.add_argument("--run", default=None, metavar="NAME", help="run directory runs/NAME (default: local)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="an explicit run directory")


def main(args: argparse.Namespace) -> int:
    root = run_root(out_dir=args.out_dir, run=args.run)
    run_dir = mode_dir(root, args.quick)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; run `python -m experiments reproduce"
                                f"{' --quick' if args.quick else ''}` first (or name it with --run / --out-dir)")
    rows, text = compare(run_dir, reference_dir(args.quick), run_dir / OUT_NAME)
    print(f"Run {run_dir} against the reference {reference_dir(args.quick)} (new / reference - 1):\n")
    print(text)
    print(f"\nwrote {run_dir / OUT_NAME}")
    return 0
