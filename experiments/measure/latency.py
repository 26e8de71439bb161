"""Latency of the compressed layers on whatever device is present, against dense in the same run.

This module is the command line (``python -m experiments latency``); the work is one module per job:
:mod:`.formats` (a spec's storage format, a layer of it from random weights), :mod:`.layer_latency`
(the layer table), :mod:`.decode_speed` (greedy decoding of the default model).

    python -m experiments latency --quick                # CPU here, a few shapes, seconds
    python -m experiments latency --formats cpu-targets --run cpu-targets   # every bit width x group
                                                         # at 4096x4096 and 4096x11008, M=1/16 (minutes)
    python -m experiments latency --sweep all --device cuda
    python -m experiments latency --decode               # also tokens/s of greedy decoding
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from experiments.core.dtypes import DTYPES
from experiments.core.runs import mode_dir, refuse_reference, run_root
from experiments.measure.decode_speed import run_decode
from experiments.measure.layer_latency import (FORMAT_PRESETS, QUICK_M, QUICK_SPECS, STANDARD_M, STANDARD_SHAPES,
                                               default_model_shapes, load_sweep_specs, run_latency)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few shapes and M, short timings (seconds)")
    p.add_argument("--sweep", default=None,
                   help="a sweep of experiments/sweeps/ (see `list`) or all (default: all; with --quick "
                        "and no --sweep, one fast format per family)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument("--formats", default=None, choices=sorted(FORMAT_PRESETS),
                   help="a preset of formats, shapes and M instead of a sweep's (cpu-targets: bits 2-8 x "
                        "groups 32/64/128/per-channel at 4096x4096 and 4096x11008, M=1 and 16)")
    p.add_argument("--decode", action="store_true",
                   help="also measure greedy-decode tokens/s of the default model, dense and compressed")
    p.add_argument("--decode-only", action="store_true",
                   help="with --decode: skip the layer table, measure only the decode speed")
    p.add_argument("--decode-dtypes", default="fp32,bf16", metavar="LIST",
                   help="with --decode: the model dtypes to decode in, each against dense in the same dtype "
                        "(default fp32,bf16; fp32 quantized models dequantize per call on CPU: slow)")
    p.add_argument("--compile", action="store_true",
                   help="with --decode: also decode under torch.compile (fullgraph, static cache; bf16 rows "
                        "labelled 'compiled', each against the compiled dense model)")
    p.add_argument("--resume", action="store_true", help="skip points already in the CSV")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 0.2, quick 0.05)")
    p.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                   help="time each point in ROUNDS rounds interleaved with the dense layers and take its "
                        "speedups as the median of the per-round ratios (default: 7 for --formats presets, "
                        "else 0: one dense timing per shape and M)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run directory runs/NAME (default: local); tables go to runs/NAME[/quick]/")
    p.add_argument("--out", default=None,
                   help="CSV path (default runs/<run>/latency_<device_type>.csv, runs/<run>/quick/... with --quick)")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(latency table, decode table) that ``main(args)`` writes."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = getattr(args, "out", None)
    out_dir = Path(out).parent if out else mode_dir(run_root(run=getattr(args, "run", None)),
                                                     getattr(args, "quick", False))
    return Path(out) if out else out_dir / f"latency_{device.type}.csv", out_dir / f"decode_{device.type}.csv"


def main(args: argparse.Namespace) -> list[dict]:
    out = getattr(args, "out", None)
    if out:
        refuse_reference(out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = getattr(args, "quick", False)
    sweep = getattr(args, "sweep", None)
    preset = getattr(args, "formats", None)
    if preset is not None and (sweep is not None or quick or getattr(args, "decode", False)):
        raise ValueError(f"--formats {preset} fixes its own formats, shapes and M: give it without "
                         "--sweep, --quick or --decode")
    if getattr(args, "compile", False) and not getattr(args, "decode", False):
        raise ValueError("--compile measures decoding under torch.compile: give it with --decode")
    if getattr(args, "decode_only", False) and not getattr(args, "decode", False):
        raise ValueError("--decode-only skips the layer table of a decode run: give it with --decode")
    names = [d.strip() for d in str(getattr(args, "decode_dtypes", "fp32,bf16")).split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ValueError(f"--decode-dtypes {getattr(args, 'decode_dtypes', '')!r}: give a comma-separated list of "
                         f"{', '.join(DTYPES)}")
    decode_dtypes = tuple(DTYPES[d] for d in names)
    interleave = getattr(args, "interleave", None)
    if preset:
        p = FORMAT_PRESETS[preset]
        specs, shapes, Ms = list(p["specs"]), list(p["shapes"]), list(p["Ms"])
        interleave = p.get("interleave", 0) if interleave is None else interleave
    else:
        specs = list(QUICK_SPECS) if quick and sweep is None else load_sweep_specs(sweep or "all", quick=quick)
        model_shapes = default_model_shapes()
        if quick:  # the smallest and largest of the model's shapes, one standard shape
            by_size = sorted(model_shapes, key=lambda t: t[1] * t[2])
            shapes, Ms = [by_size[0], by_size[-1], STANDARD_SHAPES[0]], QUICK_M
        else:
            shapes, Ms = model_shapes + list(STANDARD_SHAPES), STANDARD_M
    mrt = args.min_run_time if getattr(args, "min_run_time", None) is not None else (0.05 if quick else 0.2)
    lat_out, dec_out = output_paths(args)
    rows = [] if getattr(args, "decode_only", False) else run_latency(
        specs, shapes, Ms, device=device, min_run_time=mrt, out=lat_out, resume=getattr(args, "resume", False),
        interleave=interleave or 0)
    if getattr(args, "decode", False):
        run_decode(specs, device=device, new_tokens=16 if quick else 32, out=dec_out, dtypes=decode_dtypes,
                   resume=getattr(args, "resume", False))
        if getattr(args, "compile", False):
            run_decode(specs, device=device, new_tokens=16 if quick else 32, out=dec_out, dtypes=(torch.bfloat16,),
                       resume=getattr(args, "resume", False), compile=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    main(ap.parse_args())
