"""Headline numbers as a Markdown table, read from the result tables (the README pastes this output).

    python -m experiments summary [--quick] [--run NAME | --results-dir DIR]

Nothing here measures anything: it selects rows of ``sweep_*.csv``, ``latency_*.csv`` and
``decode_*.csv`` of the reference results (``results/``, default) or of a run directory, and prints
them with the model, text, device, date and command that produced them. Rows of different contexts
(``experiments.core.runs.SWEEP_CONTEXT`` / ``MEASURE_CONTEXT``: another model, text, settings or machine)
are never merged under one heading: each context gets its own heading, and a table that mixes
several contexts is flagged.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments.analysis.plots import RESULTS, SWEEPS, model_layer_speedup, results_dir, with_decode_speedup
from experiments.core.runs import MEASURE_CONTEXT, SWEEP_CONTEXT, check_run_name, runs_root


def _fmt(v, nd=3):
    return "" if pd.isna(v) else f"{v:.{nd}g}"


def split_contexts(df: pd.DataFrame, columns) -> list[tuple[dict, pd.DataFrame]]:
    """``df`` split by the values of ``columns`` it has, in order of first appearance."""
    cols = [c for c in columns if c in df.columns]
    if not cols or not len(df):
        return [({}, df)]
    keys = df[cols].astype(str).fillna("").agg("\x1f".join, axis=1)
    return [(dict(zip(cols, k.split("\x1f"))), df[keys == k]) for k in dict.fromkeys(keys)]


def _mixed_note(path: Path, parts: list) -> str:
    varying = sorted({c for ctx, _ in parts for c in ctx if len({p[0].get(c) for p in parts}) > 1})
    return (f"**Warning: {path} mixes {len(parts)} contexts (they differ in {', '.join(varying)}); "
            f"they are shown separately below, never merged.**\n")


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the repository when inside it (results/..., runs/...), else absolute."""
    from experiments.core.runs import REPO
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _origins(tables: list[tuple[str, pd.DataFrame]]) -> str:
    """Which commit and day produced each table of a section: ``quant: commit abc, 2026-11-24; ...``."""
    parts = []
    for name, df in tables:
        commits = ", ".join(dict.fromkeys(df["git_commit"].astype(str)))
        days = sorted({str(t)[:10] for t in df["timestamp"]})
        parts.append(f"{name}: commit {commits}, {days[0]}" + (f" to {days[-1]}" if len(days) > 1 else ""))
    return "; ".join(parts)


def sweep_summary(quick: bool, root: Path = RESULTS) -> str:
    sections: dict[tuple, list[tuple[str, pd.DataFrame]]] = {}
    notes = []
    tables = {name: (path, pd.read_csv(path)) for name in SWEEPS
              if (path := results_dir(quick, root) / f"sweep_{name}.csv").exists()}
    # Sections by the context columns every table has: a table written before a context column existed
    # (text_sha256) joins the section of the tables that agree with it on all the others. Within a table
    # every context column it has must agree.
    shared = [c for c in SWEEP_CONTEXT if all(c in df.columns for _, df in tables.values())]
    for name, (path, table) in tables.items():
        parts = split_contexts(table, SWEEP_CONTEXT)
        if len(parts) > 1:
            notes.append(_mixed_note(path, parts))
        for ctx, df in split_contexts(table, shared):
            sections.setdefault(tuple(sorted(ctx.items())), []).append((name, df))
    if not sections:
        return "(no sweep tables yet)"
    out = notes[:]
    if len(sections) > 1:
        out.append(f"**The sweep tables hold {len(sections)} different contexts (model, text, settings or "
                   f"machine); one section each.**\n")
    decode_path = results_dir(quick, root) / "decode_cpu.csv"
    decode = pd.read_csv(decode_path) if decode_path.exists() else None
    for tables in sections.values():
        meta = tables[0][1].iloc[0]
        lines = ["| sweep | point | bits/weight | x smaller than fp16 | perplexity | decode x vs dense | "
                 "aliases source grid |", "|---|---|---|---|---|---|---|"]
        dev = ""
        for name, df in tables:
            df, d = with_decode_speedup(df.assign(sweep=name), decode)
            dev = dev or d
            for _, r in df.sort_values(["method", "bits_per_weight"]).iterrows():
                sp = f"{_fmt(r['speedup'])} ({r['speedup_dtype']})" if pd.notna(r["speedup"]) else ""
                lines.append(f"| {name} | {r['point']} | {_fmt(r['bits_per_weight'])} | {_fmt(r['compression_vs_fp16'])} "
                             f"| {_fmt(r['ppl'], 4)} | {sp} "
                             f"| {'yes' if str(r['aliases_source_grid']).lower() == 'true' else ''} |")
        speed = ("\n\n*decode x vs dense*: measured greedy-decode speedup over the dense model in the same dtype: "
                 "structured points their own (timed back to back with dense in the sweep), the other points "
                 f"that of their storage format in `{_rel(decode_path, root)}`"
                 + (f" ({dev})" if dev else "") + "; empty where no decode row exists.")
        out.append(f"Model {meta['model']}, evaluation text {meta['evaluation_text']} ({int(meta['eval_tokens'])} tokens, "
                   f"seqlen {int(meta['seqlen'])}), calibration {meta['calibration_text']}; device {meta['device']}; "
                   f"{_origins(tables)}; "
                   f"command: `python -m experiments run all{' --quick' if quick else ''}`.{speed}\n\n"
                   + "\n".join(lines))
    return "\n\n".join(out)


def latency_summary(quick: bool, device_type: str = "cpu", root: Path = RESULTS) -> str:
    path = results_dir(quick, root) / f"latency_{device_type}.csv"
    if not path.exists():
        return "(no latency table yet)"
    parts = split_contexts(pd.read_csv(path), MEASURE_CONTEXT)
    out = [_mixed_note(path, parts)] if len(parts) > 1 else []
    for _, lat in parts:
        ok = lat[(lat["status"] == "ok") & (lat["method"] != "dense")]
        std = ok[ok["layer"] == "std_4096x4096"].drop_duplicates(["format", "M"])
        kind = "CPU backends, not GPU numbers" if lat["device_type"].iloc[0] == "cpu" else "GPU (Triton) backends"
        lines = [f"Layer latency, {lat['device'].iloc[0]}, torch {lat['torch'].iloc[0]}, {lat['timestamp'].iloc[0][:10]}, "
                 f"commit {lat['git_commit'].iloc[0]}; command: `python -m experiments latency"
                 f"{' --quick' if quick else ''}` (table {_rel(path, root)}). Random weights in each format; {kind}.\n",
                 "| format (4096x4096) | M | backend | activations | median ms | x vs dense fp32 | x vs dense bf16 |",
                 "|---|---|---|---|---|---|---|"]
        for _, r in std.sort_values(["M", "format"]).iterrows():
            lines.append(f"| {r['format']} | {r['M']} | {r['backend']} | {r['act_dtype']} | {_fmt(r['median_ms'])} "
                         f"| {_fmt(r.get('speedup_vs_dense_fp32'))} | {_fmt(r.get('speedup_vs_dense_bf16'))} |")
        sp = model_layer_speedup(lat)
        if len(sp):
            lines += ["", f"Summed over the default model's own layer shapes, M=1, against dense fp32 in the same run "
                          f"({lat['device'].iloc[0]}):", "",
                      "| spec | backend | ms | dense fp32 ms | speedup |", "|---|---|---|---|---|"]
            for _, r in sp.sort_values("speedup", ascending=False).iterrows():
                lines.append(f"| `{r['spec']}` | {r['backend']} | {_fmt(r['ms'])} | {_fmt(r['dense_ms'])} | {_fmt(r['speedup'])} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def decode_summary(quick: bool, device_type: str = "cpu", root: Path = RESULTS) -> str:
    path = results_dir(quick, root) / f"decode_{device_type}.csv"
    if not path.exists():
        return "(no decode table yet)"
    parts = split_contexts(pd.read_csv(path), MEASURE_CONTEXT)
    out = [_mixed_note(path, parts)] if len(parts) > 1 else []
    for _, d in parts:
        lines = [f"Greedy decode, {d['device'].iloc[0]}, torch {d['torch'].iloc[0]}, {d['timestamp'].iloc[0][:10]}:\n",
                 "| model | tokens/s | x vs dense |", "|---|---|---|"]
        for _, r in d.iterrows():
            lines.append(f"| {r['label']} | {_fmt(r['tokens_per_s'])} | {_fmt(r.get('speedup_vs_dense'))} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def compile_summary(root: Path = RESULTS) -> str:
    path = root / "compile_check.csv"
    if not path.exists():
        return "(no compile-check table yet: python -m triton_kernels.compile_check --out results/compile_check.csv)"
    d = pd.read_csv(path)
    d["family"] = d["kernel"].str.split("_").str[0]
    lines = [f"Compile check ({d['device'].iloc[0]}, triton {d['triton'].iloc[0]}, {d['timestamp'].iloc[0][:10]}, "
             f"commit {d['git_commit'].iloc[0]}; command: `python -m triton_kernels.compile_check --out results/compile_check.csv`):\n",
             "| family | target | configs | ok | max registers | total spill bytes | max shared bytes | shared limit |",
             "|---|---|---|---|---|---|---|---|"]
    for (fam, tgt), g in d.groupby(["family", "target"], sort=False):
        lines.append(f"| {fam} | {tgt} | {len(g)} | {(g['status'] == 'ok').sum()} | {_fmt(g['registers'].max(), 4)} "
                     f"| {_fmt(g['spill_bytes'].sum(), 6)} | {_fmt(g['shared_bytes'].max(), 7)} | {g['shared_limit'].iloc[0]} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    root = RESULTS
    if getattr(args, "results_dir", None):
        root = Path(args.results_dir).expanduser().resolve()
    elif getattr(args, "run", None):
        root = runs_root() / check_run_name(args.run)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist (--run / --results-dir)")
    print(compile_summary(root if (root / "compile_check.csv").exists() else RESULTS))
    print()
    print(sweep_summary(args.quick, root))
    print()
    print(latency_summary(args.quick, root=root))
    print()
    print(decode_summary(args.quick, root=root))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="summarise the quick-mode tables (<dir>/quick/)")
    p.add_argument("--run", default=None, metavar="NAME", help="summarise run runs/NAME instead of the reference results/")
    p.add_argument("--results-dir", default=None, metavar="DIR", help="summarise this results directory")
