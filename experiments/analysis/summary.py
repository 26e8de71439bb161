"""Headline numbers as Markdown tables, read from the result tables; the README and docs/ hold its output.

    python -m experiments summary [--quick] [--run NAME | --results-dir DIR]     # every table
    python -m experiments summary --only headline|compile|sweep-<name>|latency|decode|engine|gpu|gpu-status
    python -m experiments summary --write-docs | --check-docs                     # README.md, docs/

Nothing here measures anything: it selects rows of ``sweep_*.csv``, ``latency_*.csv`` and
``decode_*.csv`` of the reference results (``results/``, default) or of a run directory, and prints
them with the model, text, device, date and command that produced them. Rows of different contexts
(``experiments.core.runs.SWEEP_CONTEXT`` / ``MEASURE_CONTEXT``: another model, text, settings or machine)
are never merged under one heading: each context gets its own heading, and a table that mixes
several contexts is flagged.

The README and the pages under ``docs/`` hold generated blocks between
``<!-- summary:NAME:begin ... -->`` and ``<!-- summary:NAME:end -->`` (NAME one of :data:`BLOCKS`);
``--write-docs`` rewrites each from the reference ``results/`` and ``--check-docs`` fails when one
differs (``tests/test_docs.py`` checks the same).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from experiments.analysis.paired import ordering_note
from experiments.analysis.plots import (RESULTS, SWEEPS, UNIFORM_METHODS, decode_baseline, gpu_dequant_rows,
                                        gpu_tables, model_layer_speedup, results_dir, with_decode_speedup)
from experiments.core.runs import MEASURE_CONTEXT, REPO, SWEEP_CONTEXT, check_run_name, runs_root


def _fmt(v, nd=3):
    return "" if pd.isna(v) else f"{v:.{nd}g}"


FASTEST = "fastest dense"   # the start of with_decode_speedup's baseline for speedup_vs_fastest_dense


def _num(r, col: str) -> float:
    """A row's numeric cell, NaN when the column is absent or the cell empty (rows older than the column)."""
    v = pd.to_numeric(r.get(col, float("nan")), errors="coerce")
    return float(v) if pd.notna(v) else float("nan")


def _with_ci(r, col: str, nd: int) -> str:
    """``value [lo, hi]`` from ``col`` and ``col_lo``/``col_hi``; the value alone without them; empty without it."""
    v, lo, hi = _num(r, col), _num(r, f"{col}_lo"), _num(r, f"{col}_hi")
    if v != v:
        return ""
    return f"{_fmt(v, nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]" if lo == lo and hi == hi else _fmt(v, nd)


def _versus(r) -> str:
    """`` vs fastest dense fp32`` for a row whose speedup is over the fastest dense dtype, else ""."""
    base = str(r.get("speedup_baseline", ""))
    return f" vs {base.replace('(', '').replace(')', '')}" if base.startswith(FASTEST) else ""


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


def _sweep_sections(quick: bool, root: Path, names=None) -> tuple[list[str], dict]:
    """The sweep tables (all of :data:`SWEEPS`, or ``names``) grouped by context: (warnings, sections)."""
    sections: dict[tuple, list[tuple[str, pd.DataFrame]]] = {}
    notes = []
    tables = {name: (path, pd.read_csv(path)) for name in (names or SWEEPS)
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
    return notes, sections


def _decode_table(quick: bool, root: Path) -> tuple[Path, pd.DataFrame | None]:
    path = results_dir(quick, root) / "decode_cpu.csv"
    return path, (pd.read_csv(path) if path.exists() else None)


def sweep_summary(quick: bool, root: Path = RESULTS, names=None) -> str:
    """Every point of the sweep tables (all, or the sweeps ``names``), one table per context."""
    notes, sections = _sweep_sections(quick, root, names)
    if not sections:
        return "(no sweep tables yet)"
    out = notes[:]
    if len(sections) > 1:
        out.append(f"**The sweep tables hold {len(sections)} different contexts (model, text, settings or "
                   f"machine); one section each.**\n")
    decode_path, decode = _decode_table(quick, root)
    command = "python -m experiments run " + (" ".join(names) if names else "all") + (" --quick" if quick else "")
    for tables in sections.values():
        meta = tables[0][1].iloc[0]
        lines = ["| sweep | point | bits/weight | x smaller than fp16 | perplexity [95% CI] | KL vs dense | top-1 agreement "
                 "| task acc [95% CI] | decode x vs dense | aliases source grid |", "|---|---|---|---|---|---|---|---|---|---|"]
        dev, fastest = "", False
        for name, df in tables:
            df, d = with_decode_speedup(df.assign(sweep=name), decode)
            dev = dev or d
            for _, r in df.sort_values(["method", "bits_per_weight"]).iterrows():
                sp = f"{_fmt(r['speedup'])} ({r['speedup_dtype']}{_versus(r)})" if pd.notna(r["speedup"]) else ""
                fastest = fastest or bool(_versus(r))
                lines.append(f"| {name} | {r['point']} | {_fmt(r['bits_per_weight'])} | {_fmt(r['compression_vs_fp16'])} "
                             f"| {_with_ci(r, 'ppl', 4)} | {_fmt(_num(r, 'kl'), 3)} | {_fmt(_num(r, 'top1'), 3)} "
                             f"| {_with_ci(r, 'task_acc', 2)} | {sp} "
                             f"| {'yes' if str(r['aliases_source_grid']).lower() == 'true' else ''} |")
        speed = ("\n\n*decode x vs dense*: measured greedy-decode speedup over the dense model in the same dtype"
                 + (" (marked *vs fastest dense DTYPE*: over the fastest dense dtype measured in the same decode "
                    "run, the model a user on that machine would run)" if fastest else "") + ": "
                 "structured points their own (timed back to back with dense in the sweep), the other points "
                 f"that of their storage format in `{_rel(decode_path, root)}`"
                 + (f" ({dev})" if dev else "") + "; empty where no decode row exists.")
        speed += ("\n\n*perplexity [95% CI]*: percentile bootstrap over the evaluation windows; *KL vs dense*: mean "
                  "KL(dense ‖ point) per token, *top-1 agreement*: fraction of tokens where the point's most likely "
                  "next token is the dense model's (both on the same windows); *task acc*: the zero-shot "
                  "multiple-choice task (`experiments.lm.tasks`, Wilson interval). Empty cells: rows measured before "
                  "those columns existed, or without the task (`task_items` 0).")
        out.append(f"Model {meta['model']}, evaluation text {meta['evaluation_text']} ({int(meta['eval_tokens'])} tokens, "
                   f"seqlen {int(meta['seqlen'])}), calibration {meta['calibration_text']}; device {meta['device']}; "
                   f"{_origins(tables)}; "
                   f"command: `{command}`.{speed}\n\n"
                   + "\n".join(lines))
    return "\n\n".join(out)

def _method(r) -> str:
    return str(r.get("method", ""))


def _unquantized(r) -> bool:
    return pd.isna(r.get("quant_method"))


# The README's headline table: one row per question, each the lowest-perplexity point of the sweeps named
# that matches the predicate (a row whose sweeps hold no such point is left out).
HEADLINE_ROWS = (
    ("dense (fp16 storage)", ("quant",), lambda r: _method(r) == "dense"),
    ("4-bit weights, uniform grid (RTN, GPTQ)", ("quant", "nonuniform"),
     lambda r: _method(r) in UNIFORM_METHODS and r["bits"] == 4),
    ("3-bit weights, uniform grid (RTN, GPTQ)", ("quant", "nonuniform"),
     lambda r: _method(r) in UNIFORM_METHODS and r["bits"] == 3),
    ("3-3.3 bits per weight: AWQ, HQQ, rotations, mixed precision", ("modern",),
     lambda r: _method(r) in ("awq", "hqq", "quarot", "mixed") and 3 <= float(r["bits_per_weight"]) <= 3.3),
    ("4-bit weights, codebook (non-uniform grid)", ("nonuniform",),
     lambda r: _method(r) not in (*UNIFORM_METHODS, "dense") and r["bits"] == 4),
    ("3-bit weights, codebook (non-uniform grid)", ("nonuniform",),
     lambda r: _method(r) not in (*UNIFORM_METHODS, "dense") and r["bits"] == 3),
    ("2:4 sparsity", ("sparsity",), lambda r: str(r.get("pattern")) == "2:4"),
    ("50% unstructured sparsity", ("sparsity",),
     lambda r: str(r.get("pattern")) == "unstructured" and r["sparsity"] == 0.5),
    ("low rank, 50% of the parameters", ("lowrank",), lambda r: r["ratio"] == 0.5),
    ("low rank, 90% of the parameters", ("lowrank",), lambda r: r["ratio"] == 0.9),
    ("2:4 sparsity + 4-bit", ("combo",), lambda r: str(r.get("pattern")) == "2:4" and r["bits"] == 4),
    ("20% of the MLP channels removed", ("structured",),
     lambda r: _method(r) == "channels" and r["sparsity"] == 0.2 and _unquantized(r)),
    ("10% of the attention heads removed", ("structured",),
     lambda r: _method(r) == "heads" and r["sparsity"] == 0.1 and _unquantized(r)),
    ("4 whole blocks dropped", ("structured",),
     lambda r: _method(r) == "layers" and r["blocks"] == 4 and _unquantized(r)),
    ("structured pruning + 4-bit", ("structured",),
     lambda r: _method(r) != "dense" and r.get("quant_method") in UNIFORM_METHODS and r["bits"] == 4),
)


def headline_summary(quick: bool = False, root: Path = RESULTS) -> str:
    """The best point of each family at each setting of :data:`HEADLINE_ROWS`, with size, perplexity
    and measured decode speedup; one table per context."""
    notes, sections = _sweep_sections(quick, root)
    if not sections:
        return "(no sweep tables yet)"
    out = notes[:]
    if len(sections) > 1:
        out.append(f"**The sweep tables hold {len(sections)} different contexts (model, text, settings or "
                   f"machine); one headline table each.**\n")
    decode_path, decode = _decode_table(quick, root)
    for tables in sections.values():
        by_name = dict(tables)
        meta = tables[0][1].iloc[0]
        lines = ["| compression | best point (sweep) | bits/weight | MB | perplexity | decode × dense |",
                 "|---|---|---|---|---|---|"]
        dev, modelled, cells = "", False, []   # (row up to the speedup, speedup, its baseline or "")
        for label, sweeps, pick in HEADLINE_ROWS:
            frames = [by_name[n].assign(sweep=n) for n in sweeps if n in by_name]
            if not frames:
                continue
            df = pd.concat(frames, ignore_index=True)
            df = df[[bool(pick(r)) for _, r in df.iterrows()] if len(df) else []]
            df = df[pd.to_numeric(df["ppl"], errors="coerce").notna()]
            if not len(df):
                continue
            ranked = df.loc[pd.to_numeric(df["ppl"]).sort_values(kind="stable").index]
            # "The best point" is an ordering: say so when the runner-up is within the windows' noise
            # (experiments.analysis.paired; rows without window_nll say nothing).
            note = ordering_note(ranked.iloc[0], ranked.iloc[1]) if len(ranked) > 1 else None
            df, d = with_decode_speedup(ranked.iloc[:1], decode)
            dev = dev or d
            r = df.iloc[0]
            star = str(r.get("size_is_modelled")).lower() == "true"
            modelled = modelled or star
            base = ""
            if _method(r) == "dense":
                sp = "1"
            elif pd.notna(r["speedup"]):
                sp = _fmt(r["speedup"]) + ("" if r["speedup_dtype"] == "bf16" else f" ({r['speedup_dtype']})")
                base = r["speedup_baseline"]
            else:
                sp = ""
            cells.append((f"| {label} | {r['point']} ({r['sweep']}){'; ' + note if note else ''} "
                          f"| {_fmt(r['bits_per_weight'])}{'*' if star else ''} | {_fmt(r['bytes'] / 1e6)}{'*' if star else ''} "
                          f"| {_fmt(r['ppl'], 4)}", sp, base))
        # One baseline for every speedup shown: the caption names it; several: each cell names its own.
        bases = sorted({b for *_, b in cells if b})
        lines += [f"{head} | {sp}{f' (vs {b})' if b and len(bases) > 1 else ''} |" for head, sp, b in cells]
        versus = ("the dense model, bf16" if bases in ([], ["dense bf16"])
                  else f"the fastest dense model measured in the same decode run, {bases[0][len(FASTEST) + 2:-1]}, "
                       f"the compressed models in bf16" if len(bases) == 1 and bases[0].startswith(FASTEST)
                  else "the dense model (each cell names its baseline: the fastest dense dtype of the same decode "
                       "run where the decode table has it, else dense in the same dtype)")
        out.append(
            f"Model {meta['model']}; perplexity on {meta['evaluation_text']} ({int(meta['eval_tokens'])} tokens, "
            f"seqlen {int(meta['seqlen'])}); each row the lowest perplexity the sweep tables hold for that "
            f"setting (`python -m experiments summary --headline`). Size: the transformer blocks' weights, "
            f"bits per original weight and MB (floats counted at 16 bits). *decode × dense*: measured "
            f"greedy-decode speedup over {versus}, on {dev or meta['device']} (structured points "
            f"timed with the dense model in their sweep, the others by their storage format in "
            f"`{_rel(decode_path, root)}`; empty where that format has no decode row)."
            + (" \\* modelled size: no fused sparse + quantized kernel exists." if modelled else "")
            + "\n\n" + "\n".join(lines))
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
        fastest = ("speedup_vs_fastest_dense" in d
                   and pd.to_numeric(d["speedup_vs_fastest_dense"], errors="coerce").notna().any())
        lines = [f"Greedy decode, {d['device'].iloc[0]}, torch {d['torch'].iloc[0]}, {d['timestamp'].iloc[0][:10]}:\n",
                 "| model | tokens/s | x vs dense |" + (" x vs fastest dense (same run) |" if fastest else ""),
                 "|---|---|---|" + ("---|" if fastest else "")]
        for _, r in d.iterrows():
            cell = ""
            if fastest:
                sp, base = decode_baseline(r)
                cell = f" {_fmt(sp)} ({base.removeprefix(FASTEST + ' (')[:-1]}) |" if base.startswith(FASTEST) else " |"
            lines.append(f"| {r['label']} | {_fmt(r['tokens_per_s'])} | {_fmt(r.get('speedup_vs_dense'))} |{cell}")
        if fastest:
            lines.append("\n*x vs fastest dense*: over the fastest dense dtype measured in the same decode run (in "
                         "brackets); empty for rows measured before that column or whose dense rows came from "
                         "another run.")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def engine_summary(quick: bool, device_type: str = "cpu", root: Path = RESULTS) -> str:
    """The engine table (``python -m experiments engine``): llama.cpp and the toolkit's own compiled decode of
    the same models in the same interleaved rounds, with the engine's perplexity beside the toolkit's."""
    path = results_dir(quick, root) / f"engine_{device_type}.csv"
    if not path.exists():
        return "(no engine table yet: python -m experiments engine)"
    d = pd.read_csv(path)
    if "engine" not in d:
        return "(the engine table has no engine column)"
    num = lambda c: pd.to_numeric(d[c], errors="coerce") if c in d else pd.Series([float("nan")] * len(d))
    first = d.iloc[0]
    lines = [f"Greedy decode, {first['device']} ({first.get('cpu_isa', '')}), {first['timestamp'][:10]}, commit "
             f"{first['git_commit']}, {first.get('engine_version', '')}, torch {first['torch']}; {int(first['new_tokens'])} "
             f"one-token steps after the prompt (prefill untimed), median of {int(first['repeats'])} interleaved rounds; "
             f"load average before timing {first.get('loadavg_before', '')}:\n",
             "| engine | model | GGUF types | tok/s | x vs fastest dense (same engine) | toolkit / llama.cpp, same point "
             "| toolkit / llama.cpp Q4_0 | engine ppl | toolkit ppl | engine ΔNLL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    d = d.assign(_sp=num("speedup_vs_fastest_dense"), _fe=num("fraction_of_engine"), _fq=num("fraction_of_engine_q4_0"),
                 _ep=num("engine_ppl"), _tp=num("toolkit_ppl"), _dn=num("engine_dnll"), _tps=num("tokens_per_s"))
    for _, r in d.iterrows():
        lines.append(f"| {r['engine']} | {r['label']} | {r.get('gguf_types', '') if pd.notna(r.get('gguf_types')) else ''} "
                     f"| {_fmt(r['_tps'])} | {_fmt(r['_sp'])} | {_fmt(r['_fe'])} | {_fmt(r['_fq'])} | {_fmt(r['_ep'], 4)} "
                     f"| {_fmt(r['_tp'], 4)} | {_fmt(r['_dn'], 2)} |")
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------
# GPU: which numbers are of the current kernels
# ---------------------------------------------------------------------------------------------
GPU_FIGURES = ("gpu_speedup_vs_batch", "gpu_bandwidth")


def _revision_word(rev: int) -> str:
    from triton_kernels.provenance import KERNEL_REVISION
    return "current kernels" if rev == KERNEL_REVISION else f"old kernels (revision {rev})"


def _gpu_value(rows: pd.DataFrame, variant: str, M: int, col: str, shape: str | None = None):
    """``col`` of the row of ``variant`` at ``M`` (on ``shape``, else the largest shape that has one), with that
    row; (None, None) when there is none."""
    r = rows[(rows["variant"] == variant) & (rows["M"] == M)]
    if shape is not None:
        r = r[r["shape"] == shape]
    r = r[pd.to_numeric(r.get(col), errors="coerce").notna()] if col in r.columns else r.iloc[0:0]
    if not len(r):
        return None, None
    r = r.assign(_size=r["N"] * r["K"]).sort_values(["_size", "N"]).iloc[-1]  # ties: the taller (28672x8192)
    return float(r[col]), r


def _lowrank_fused_wins(sl: pd.DataFrame):
    """Whether the fused low-rank kernel beat two GEMMs at every r <= 128 (M=1), from a sparse_lowrank table."""
    m1 = sl[(sl["M"] == 1) & sl["variant"].astype(str).str.startswith("rank")]
    pairs = []
    for r in (32, 64, 128):
        f = m1[m1["variant"] == f"rank{r}_fused"]["median_ms"]
        t = m1[m1["variant"] == f"rank{r}_two_gemm"]["median_ms"]
        if len(f) and len(t):
            pairs.append(float(f.iloc[0]) < float(t.iloc[0]))
    return (all(pairs), f"{sum(pairs)} of {len(pairs)} ranks") if pairs else (None, "")


def gpu_targets(tables: dict[str, pd.DataFrame]) -> list[tuple[str, str]]:
    """``(target, status)`` for each GPU target: met / not met where the current kernels were measured,
    open otherwise (with what the old kernels measured, if anything)."""
    from triton_kernels.provenance import KERNEL_REVISION
    dq = gpu_dequant_rows(tables)
    sl = tables.get("sparse_lowrank")
    sl = sl[sl["status"] == "ok"] if sl is not None and "status" in sl.columns else None
    checks = [
        ("4-bit g128, M=1: ≥ 3× cuBLAS fp16", dq, "int4_g128_asym", 1, "speedup_vs_fp16", 3.0, "×"),
        ("4-bit g128, M=1: ≥ 70% of copy bandwidth", dq, "int4_g128_asym", 1, "pct_copy_bw", 70.0, "%"),
        ("prefill at M=2048: ≥ 0.8× cuBLAS fp16", dq, "int4_g128_asym", 2048, "speedup_vs_fp16", 0.8, "×"),
        ("block-sparse 90%: ≥ 4× dense fp16", sl, "block32_s0.9", 1, "speedup_vs_fp16", 4.0, "×"),
        ("activation-sparse 50%: ≥ 1.6× dense fp16", sl, "activation_s0.5", 1, "speedup_vs_fp16", 1.6, "×"),
    ]
    out = []
    for label, rows, variant, M, col, goal, unit in checks:
        measured = rows is not None and "variant" in rows.columns
        value, row = _gpu_value(rows, variant, M, col) if measured else (None, None)
        if value is None:
            out.append((label, "open: never measured on a GPU"))
            continue
        where = f"{row['shape']}, {row['device']}, commit {str(row['git_commit'])[:7]}"
        shown = f"{value:.3g}{unit}"
        if int(row.get("kernel_revision", 1)) != KERNEL_REVISION:
            out.append((label, f"open: not measured on the current kernels (old kernels: {shown}, {where})"))
        else:
            out.append((label, f"{'met' if value >= goal else 'not met'}: {shown} ({where})"))
    label = "fused low rank faster than two GEMMs at r ≤ 128 (M=1)"
    if sl is None or not len(sl):
        out.append((label, "open: never measured on a GPU"))
    else:
        wins, detail = _lowrank_fused_wins(sl)
        current = set(sl.get("kernel_revision", pd.Series([1]))) == {KERNEL_REVISION}
        if wins is None:
            out.append((label, "open: never measured on a GPU"))
        elif not current:
            out.append((label, f"open: not measured on the current kernels (old kernels: faster at {detail})"))
        else:
            out.append((label, f"{'met' if wins else 'not met'}: faster at {detail}"))
    return out


def _gpu_figure_lines(root: Path, prefix: str) -> list[str]:
    return [f"![{name.replace('_', ' ')}]({prefix}results/figures/{name}.png)" for name in GPU_FIGURES
            if (root / "figures" / f"{name}.png").exists()]


def gpu_summary(root: Path = RESULTS) -> str:
    """docs/gpu.md's account of the GPU tables: which kernels each measured (current or old), the decode
    and prefill numbers of ``dequant_matmul``, the targets, and the figures when drawn."""
    from triton_kernels.provenance import KERNEL_REVISION
    tables = gpu_tables(root)
    if not tables:
        return "(no GPU tables yet: `make gpu-check` on a machine with a CUDA GPU writes results/gpu/*.csv)"
    lines = [f"GPU tables in `{_rel(root / 'gpu', root)}/` (`make gpu-check`). A number is of the *current kernels* "
             f"when the kernel revision it measured (its `kernel_revision` column; rows written before that column "
             f"existed measured revision 1) is today's, {KERNEL_REVISION} (`triton_kernels/provenance.py`); "
             f"otherwise it is of *old kernels* and says nothing about today's code.\n",
             "| table | rows | device | commit | date | kernel revision | numbers are of |",
             "|---|---|---|---|---|---|---|"]
    n_current = 0
    for name, df in tables.items():
        for rev, g in df.groupby("kernel_revision", sort=True):
            n_current += len(g) if rev == KERNEL_REVISION else 0
            commits = ", ".join(dict.fromkeys(str(c)[:7] for c in g["git_commit"]))
            days = sorted({str(t)[:10] for t in g["timestamp"]})
            lines.append(f"| {name}.csv | {len(g)} | {', '.join(dict.fromkeys(map(str, g['device'])))} | {commits} "
                         f"| {days[0]}{' to ' + days[-1] if len(days) > 1 else ''} | {rev} | {_revision_word(rev)} |")
    lines += ["", f"**{n_current} GPU numbers are of the current kernels**"
              + ("; every other row above is of old kernels." if n_current else
                 ": every GPU number above is of old kernels, so every GPU target is open.")]
    dq = gpu_dequant_rows(tables)
    if len(dq):
        lines += ["", "`dequant_matmul` (asymmetric, groups of 128) against cuBLAS fp16 `F.linear` (newest row of each "
                      "point; `python -m experiments summary --only gpu`):", "",
                  "| shape (N × K) | M | format | ms | cuBLAS fp16 ms | × vs fp16 | % copy BW | kernels |",
                  "|---|---|---|---|---|---|---|---|"]
        q = dq[dq["variant"].astype(str).str.fullmatch(r"int\d_g128_asym")]
        largest = q.assign(_size=q["N"] * q["K"]).sort_values(["_size", "N"])["shape"].iloc[-1] if len(q) else None
        pick = q[((q["M"] == 1) & (q["variant"] == "int4_g128_asym"))
                 | ((q["shape"] == largest) & ((q["M"] == 1) | ((q["variant"] == "int4_g128_asym")
                                                             & q["M"].isin([16, 2048]))))]
        for _, r in pick.sort_values(["M", "N", "K", "variant"], ascending=[True, False, False, False]).iterrows():
            dense = dq[(dq["shape"] == r["shape"]) & (dq["M"] == r["M"]) & (dq["variant"] == "dense_fp16")
                       & (dq["timestamp"] == r["timestamp"])]["median_ms"]
            lines.append(f"| {r['shape'].replace('x', '×')} | {r['M']} | int{r['variant'][3]} g128 "
                         f"| {_fmt(r['median_ms'], 4)} "
                         f"| {_fmt(dense.iloc[0], 4) if len(dense) else ''} | {_fmt(r['speedup_vs_fp16'], 2)} "
                         f"| {_fmt(pd.to_numeric(r['pct_copy_bw'], errors='coerce'), 2)} "
                         f"| {_revision_word(int(r['kernel_revision']))} |")
    lines += ["", "| target | status |", "|---|---|"]
    lines += [f"| {t} | {st} |" for t, st in gpu_targets(tables)]
    figs = _gpu_figure_lines(root, "../")
    lines += ["", *figs] if figs else [
        "", "Figures: `make gpu-report` draws `results/figures/gpu_speedup_vs_batch.png` (speedup over cuBLAS fp16 "
            "against M, one line per bit width, ideal 16/bits dashed) and `gpu_bandwidth.png` (% of copy bandwidth "
            "at M=1) from these tables; not drawn yet."]
    return "\n".join(lines)


def gpu_status(root: Path = RESULTS) -> str:
    """The README's short GPU paragraph: whether any GPU number is of the current kernels, and the headline."""
    from triton_kernels.provenance import KERNEL_REVISION
    tables = gpu_tables(root)
    if not tables:
        return ("**GPU**: nothing measured on a GPU yet; `make gpu-check` measures the kernels where one exists "
                "([docs/gpu.md](docs/gpu.md)).")
    dq = gpu_dequant_rows(tables)
    x, row = _gpu_value(dq, "int4_g128_asym", 1, "speedup_vs_fp16") if len(dq) else (None, None)
    bw, _ = _gpu_value(dq, "int4_g128_asym", 1, "pct_copy_bw", shape=row["shape"]) if row is not None else (None, None)
    revs = sorted({int(r) for df in tables.values() for r in df["kernel_revision"]})
    runs = sorted({(str(d), str(c)[:7], str(t)[:10]) for df in tables.values()
                   for d, c, t in zip(df["device"], df["git_commit"], df["timestamp"])})
    where = "; ".join(f"{d}, commit {c}, {t}" for d, c, t in runs)
    head = ""
    if row is not None:
        head = f"4-bit g128 at M=1 on {row['shape']}: {x:.3g}× cuBLAS fp16" + (
            f", {bw:.3g}% of copy bandwidth" if bw is not None else "")
    figs = _gpu_figure_lines(root, "")
    if KERNEL_REVISION not in revs:
        text = (f"**GPU: no number measures the current kernels.** Every GPU number in `results/gpu/` is of old "
                f"kernels (revision {'/'.join(map(str, revs))}; {where}" + (f"; {head}" if head else "")
                + f"); the kernels have been rebuilt since (revision {KERNEL_REVISION}), so every GPU target is open "
                f"until `make gpu-check` runs on a GPU ([docs/gpu.md](docs/gpu.md)).")
        return text
    old = sorted(name for name, df in tables.items() if set(df["kernel_revision"]) != {KERNEL_REVISION})
    text = (f"**GPU** (current kernels, revision {KERNEL_REVISION}; {where}): " + (head or "no dequant rows")
            + (f". Old-kernel numbers remain in {', '.join(f'`{n}.csv`' for n in old)}" if old else "")
            + "; every table and target: [docs/gpu.md](docs/gpu.md).")
    return "\n\n".join([text, *figs])


def _claims(quick: bool, root: Path) -> str:
    from experiments.analysis.claims import claims_summary
    return claims_summary(quick, root)


# The generated blocks of README.md and docs/*.md: NAME -> its text from a results directory.
BLOCKS = {
    "headline": lambda root: headline_summary(False, root),
    "compile": compile_summary,
    **{f"sweep-{name}": (lambda root, name=name: sweep_summary(False, root, (name,))) for name in SWEEPS},
    "latency": lambda root: latency_summary(False, root=root),
    "decode": lambda root: decode_summary(False, root=root),
    "engine": lambda root: engine_summary(False, root=root),
    "gpu": gpu_summary,
    "gpu-status": gpu_status,
    "claims": lambda root: _claims(False, root),
    "claims-quick": lambda root: _claims(True, root),
}
# A marker is a line of its own (a marker quoted inside a line, as in these docs, is text).
_BLOCK = re.compile(r"^(<!-- summary:(?P<name>[\w-]+):begin[^>\n]*-->\n)(?P<body>.*?)^(<!-- summary:(?P=name):end -->)$",
                    re.S | re.M)
_OPEN = re.compile(r"^<!-- summary:[\w-]+:begin", re.M)


def doc_files(repo: Path = REPO) -> list[Path]:
    """The Markdown files that may hold generated blocks: README.md and docs/**/*.md."""
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def render_docs(text: str, root: Path = RESULTS, where: str = "") -> str:
    """``text`` with every generated block rewritten from the results directory ``root``."""
    names = [m["name"] for m in _BLOCK.finditer(text)]
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ValueError(f"{where or 'text'}: unknown generated block(s) {', '.join(unknown)}; "
                         f"known: {', '.join(BLOCKS)}")
    opened = len(_OPEN.findall(text))
    if opened != len(names):
        raise ValueError(f"{where or 'text'}: {opened} '<!-- summary:NAME:begin' markers but {len(names)} "
                         f"complete blocks (each needs its '<!-- summary:NAME:end -->')")
    cache: dict[str, str] = {}

    def block(m: re.Match) -> str:
        if m["name"] not in cache:
            cache[m["name"]] = BLOCKS[m["name"]](root).rstrip("\n") + "\n"
        return m.group(1) + cache[m["name"]] + m.group(4)
    return _BLOCK.sub(block, text)


def write_docs(files: list[Path] | None = None, root: Path = RESULTS, check: bool = False) -> list[Path]:
    """Rewrite the generated blocks of ``files`` (default :func:`doc_files`) from ``root``; returns the
    files whose blocks changed (with ``check``, nothing is written)."""
    rendered = {}  # every file rendered before any is written: a bad marker anywhere changes nothing
    for f in files or doc_files():
        text = f.read_text()
        new = render_docs(text, root, where=_rel(f, root))
        if new != text:
            rendered[f] = new
    if not check:
        for f, new in rendered.items():
            tmp = f.with_name(f".{f.name}.tmp")
            tmp.write_text(new)
            tmp.replace(f)
    return list(rendered)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "write_docs", False) or getattr(args, "check_docs", False):
        if args.quick or args.run or args.results_dir or args.only:
            raise ValueError("--write-docs / --check-docs regenerate README.md and docs/ from the reference "
                             "results/ only: drop --quick, --run, --results-dir and --only")
        stale = write_docs(check=args.check_docs)
        for f in stale:
            print(_rel(f, RESULTS))
        if args.check_docs and stale:
            print(f"error: {len(stale)} file(s) hold generated tables that differ from results/; "
                  f"run `python -m experiments summary --write-docs`", file=sys.stderr)
            return 1
        return 0
    root = RESULTS
    if getattr(args, "results_dir", None):
        root = Path(args.results_dir).expanduser().resolve()
    elif getattr(args, "run", None):
        root = runs_root() / check_run_name(args.run)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist (--run / --results-dir)")
    only = getattr(args, "only", None)
    if only == "headline":
        print(headline_summary(args.quick, root))
        return 0
    if only == "compile":
        print(compile_summary(root))
        return 0
    if only and only.startswith("sweep-"):
        print(sweep_summary(args.quick, root, (only[len("sweep-"):],)))
        return 0
    if only == "latency":
        print(latency_summary(args.quick, root=root))
        return 0
    if only == "decode":
        print(decode_summary(args.quick, root=root))
        return 0
    if only == "engine":
        print(engine_summary(args.quick, root=root))
        return 0
    if only in ("claims", "claims-quick"):
        print(_claims(args.quick or only == "claims-quick", root))
        return 0
    if only in ("gpu", "gpu-status"):
        print(BLOCKS[only](root))
        return 0
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
    p.add_argument("--only", default=None, choices=tuple(BLOCKS), metavar="TABLE",
                   help=f"print one table: {', '.join(BLOCKS)}")
    p.add_argument("--headline", action="store_const", const="headline", dest="only",
                   help="print the README's headline table (= --only headline)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write-docs", action="store_true",
                   help="rewrite the generated tables in README.md and docs/*.md from results/ "
                        "(between <!-- summary:NAME:begin --> and <!-- summary:NAME:end -->)")
    g.add_argument("--check-docs", action="store_true",
                   help="exit 1, naming the files, when a generated table in README.md or docs/ differs from results/")
