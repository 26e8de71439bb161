"""Headline numbers as a Markdown table, read from the result tables (the README pastes this output).

    python -m experiments summary [--quick]

Nothing here measures anything: it selects rows of ``results/sweep_*.csv``, ``latency_*.csv`` and
``decode_*.csv`` and prints them with the device, date and command that produced them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments.plots import RESULTS, SWEEPS, model_layer_speedup, results_dir


def _fmt(v, nd=3):
    return "" if pd.isna(v) else f"{v:.{nd}g}"


def sweep_summary(quick: bool, root: Path = RESULTS) -> str:
    lines = ["| sweep | point | bits/weight | x smaller than fp16 | perplexity | aliases source grid |",
             "|---|---|---|---|---|---|"]
    meta = None
    for name in SWEEPS:
        path = results_dir(quick, root) / f"sweep_{name}.csv"
        if not path.exists():
            continue
        df = pd.read_csv(path)
        meta = df.iloc[0] if meta is None else meta
        for _, r in df.sort_values(["method", "bits_per_weight"]).iterrows():
            lines.append(f"| {name} | {r['point']} | {_fmt(r['bits_per_weight'])} | {_fmt(r['compression_vs_fp16'])} "
                         f"| {_fmt(r['ppl'], 4)} | {'yes' if str(r['aliases_source_grid']).lower() == 'true' else ''} |")
    if meta is None:
        return "(no sweep tables yet)"
    head = (f"Model {meta['model']}, evaluation text {meta['evaluation_text']} ({int(meta['eval_tokens'])} tokens, "
            f"seqlen {int(meta['seqlen'])}), calibration {meta['calibration_text']}; device {meta['device']}; "
            f"commit {meta['git_commit']}; {meta['timestamp'][:10]}; "
            f"command: `python -m experiments run all{' --quick' if quick else ''}`.\n\n")
    return head + "\n".join(lines)


def latency_summary(quick: bool, device_type: str = "cpu", root: Path = RESULTS) -> str:
    path = results_dir(quick, root) / f"latency_{device_type}.csv"
    if not path.exists():
        return "(no latency table yet)"
    lat = pd.read_csv(path)
    ok = lat[(lat["status"] == "ok") & (lat["method"] != "dense")]
    std = ok[ok["layer"] == "std_4096x4096"].drop_duplicates(["format", "M"])
    lines = [f"Layer latency, {lat['device'].iloc[0]}, {lat['timestamp'].iloc[0][:10]}, "
             f"commit {lat['git_commit'].iloc[0]}; command: `python -m experiments latency"
             f"{' --quick' if quick else ''} --out {path.relative_to(root.parent)}`. Random weights in each format; "
             f"CPU backends, not GPU numbers.\n",
             "| format (4096x4096) | M | backend | activations | median ms | x vs dense fp32 | x vs dense bf16 |",
             "|---|---|---|---|---|---|---|"]
    for _, r in std.sort_values(["M", "format"]).iterrows():
        lines.append(f"| {r['format']} | {r['M']} | {r['backend']} | {r['act_dtype']} | {_fmt(r['median_ms'])} "
                     f"| {_fmt(r.get('speedup_vs_dense_fp32'))} | {_fmt(r.get('speedup_vs_dense_bf16'))} |")
    sp = model_layer_speedup(lat)
    if len(sp):
        lines += ["", "Summed over the default model's own layer shapes, M=1, against dense fp32 in the same run:", "",
                  "| spec | backend | ms | dense fp32 ms | speedup |", "|---|---|---|---|---|"]
        for _, r in sp.sort_values("speedup", ascending=False).iterrows():
            lines.append(f"| `{r['spec']}` | {r['backend']} | {_fmt(r['ms'])} | {_fmt(r['dense_ms'])} | {_fmt(r['speedup'])} |")
    return "\n".join(lines)


def decode_summary(quick: bool, device_type: str = "cpu", root: Path = RESULTS) -> str:
    path = results_dir(quick, root) / f"decode_{device_type}.csv"
    if not path.exists():
        return "(no decode table yet)"
    d = pd.read_csv(path)
    lines = [f"Greedy decode, {d['device'].iloc[0]}, {d['timestamp'].iloc[0][:10]}:\n",
             "| model | tokens/s | x vs dense |", "|---|---|---|"]
    for _, r in d.iterrows():
        lines.append(f"| {r['label']} | {_fmt(r['tokens_per_s'])} | {_fmt(r.get('speedup_vs_dense'))} |")
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


def main(args: argparse.Namespace) -> int:
    print(compile_summary())
    print()
    print(sweep_summary(args.quick))
    print()
    print(latency_summary(args.quick))
    print()
    print(decode_summary(args.quick))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="summarise results/quick/ instead of results/")
